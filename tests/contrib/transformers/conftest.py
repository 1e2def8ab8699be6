"""Fixtures: a tiny random Llama (fast, for the plumbing) and engines; SmolLM2 is in tests/conftest.py."""

from __future__ import annotations

import pytest
import torch
from kvstacks.testing import require


@pytest.fixture(scope="session")
def tiny_model():
    """A 3-layer Llama with random weights: 4 query heads, 2 KV heads of 16 dims. Loads in milliseconds."""
    transformers = require("transformers", "pip install 'transformers>=5'")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def make_engine(tmp_path):
    """Build CacheEngines over real cpu (and optionally disk) tiers; all closed at the end."""
    require("kvstacks_cpu", "pip install -e plugins/cpu")
    from kvstacks import CacheEngine

    engines = []

    def make(model: str = "test-model", chunk_size: int = 16, disk: bool = False):
        stack = [{"backend": "cpu", "capacity": "1GiB", "prefault": False}]  # no GiB to fault in per test
        if disk:
            require("kvstacks_disk", "pip install -e plugins/disk")
            stack.append({"backend": "disk", "path": str(tmp_path / "disk"), "capacity": "4GiB"})
        engine = CacheEngine.from_config({"model": model, "chunk_size": chunk_size, "stack": stack})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
