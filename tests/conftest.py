"""Fixtures shared across test packages: the real SmolLM2 model, loaded once per session."""

from __future__ import annotations

import pytest
from kvstacks.testing import in_ci, require


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once (about 20 s)."""
    require("gguf", "pip install gguf")
    require("accelerate", "pip install accelerate")
    from kvstacks_transformers.smollm2 import ModelUnavailable, load_smollm2

    try:
        return load_smollm2(progress=False)
    except ModelUnavailable as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: every dependency must be installed in CI)", pytrace=False)
        pytest.skip(str(exc))
