"""cachegen as the compressor of a real engine tier (cpu backend): store, retrieve, promote."""

from __future__ import annotations

import time

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.plugins import registry
from kvstacks.testing import random_kv


@pytest.fixture
def engine():
    if "cpu" not in registry().names("backends"):
        pytest.skip("needs the cpu backend (pip install kvstacks-cpu)")
    eng = CacheEngine.from_config({
        "model": "cachegen-test", "chunk_size": 64,
        "stack": [{"backend": "cpu", "name": "hot", "capacity": "64MiB"},
                  {"backend": "cpu", "name": "cold", "capacity": "64MiB", "compressor": "cachegen",
                   "compressor_options": {"level": "default", "workers": 0}}],
    })
    yield eng
    eng.close()


def test_compressed_tier_round_trip(engine):
    tokens = list(range(1000, 1200))
    kv = random_kv(4, len(tokens), 64, torch.float16, seed=30)
    engine.store(tokens, kv)
    engine.clear(tier="hot")
    # wait until write-through reached the cold tier
    for _ in range(200):
        if engine.lookup_tiers(tokens).get("cold", 0) == len(tokens):
            break
        time.sleep(0.05)
    assert engine.lookup_tiers(tokens)["cold"] == len(tokens)
    cold = engine.stats()["cold"]
    assert cold["bytes"] < kv.numel() * 2 / 2.5, "the cold tier holds compressed chunks"
    out, n = engine.retrieve(tokens)
    assert n == len(tokens) and out.shape == kv.shape and out.dtype == kv.dtype
    err = (out.float() - kv.float()).abs()
    assert float(err.max()) <= 0.1 * float(kv.float().abs().max())
    assert not torch.equal(out, kv), "lossy: the values came back quantized"
