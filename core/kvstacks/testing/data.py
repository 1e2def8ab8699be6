"""Test data: KV tensors that look like real KV, unique keys, exact comparisons."""

from __future__ import annotations

import math
import uuid

import torch
import torch.nn.functional as F

from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

KIT_MODEL = "kvstacks-kit"


def random_kv(
    layers: int = 2,
    tokens: int = 16,
    hidden: int = 64,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> torch.Tensor:
    """A synthetic KV tensor ``[2, layers, tokens, hidden]``, deterministic in ``seed``.

    Not white noise: real KV has per-channel scales and offsets (a few channels
    much larger than the rest) and drifts smoothly along the tokens, and that is
    what compressors exploit or fail to. Each channel here is an offset plus a
    lognormally scaled, smoothed (AR(1)-like) walk over tokens plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(2, layers, 1, hidden, generator=g) * 0.8)
    offset = torch.randn(2, layers, 1, hidden, generator=g) * scale
    noise = torch.randn(2 * layers * hidden, 1, tokens + 31, generator=g)
    # Exponential smoothing as a 32-tap convolution: a stationary, smooth signal.
    taps = torch.tensor([0.9**k for k in range(31, -1, -1)])
    taps = (taps / taps.norm()).view(1, 1, -1)
    smooth = F.conv1d(noise, taps).view(2, layers, hidden, tokens).transpose(2, 3)
    jitter = torch.randn(2, layers, tokens, hidden, generator=g)
    kv = offset + scale * (0.9 * smooth + math.sqrt(1 - 0.81) * jitter)
    return kv.to(dtype).contiguous()


def random_key(model: str = KIT_MODEL, rank: int = 0, world_size: int = 1) -> CacheKey:
    """A key no other test (or earlier run against a shared store) has used."""
    return CacheKey(model, "kv", world_size, rank, uuid.uuid4().bytes)


def raw_obj(key: CacheKey, kv: torch.Tensor) -> MemoryObj:
    return MemoryObj(key, kv, tuple(kv.shape), kv.dtype)


def opaque_compressed_obj(key: CacheKey, payload_len: int = 3001, seed: int = 0) -> MemoryObj:
    """A compressed-looking object (uint8 payload of odd length) that a backend must store blindly."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (payload_len,), dtype=torch.uint8, generator=g)
    return MemoryObj(key, data, (2, 2, 16, 64), torch.float16, "kit-opaque")


def bits(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, for bit-exact comparison (NaN == NaN, -0.0 != 0.0)."""
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same_obj(got: MemoryObj | None, expected: MemoryObj, context: str = "") -> None:
    """``got`` is ``expected``: same key, shape, dtype, compressor and bytes."""
    where = f" ({context})" if context else ""
    assert got is not None, f"expected the object back, got None{where}"
    assert isinstance(got, MemoryObj), f"expected a MemoryObj, got {type(got).__name__}{where}"
    assert got.key == expected.key, f"key changed: {got.key} != {expected.key}{where}"
    assert tuple(got.shape) == tuple(expected.shape), f"shape changed: {got.shape} != {expected.shape}{where}"
    assert got.dtype == expected.dtype, f"dtype changed: {got.dtype} != {expected.dtype}{where}"
    assert got.compressor == expected.compressor, (
        f"compressor changed: {got.compressor!r} != {expected.compressor!r}{where}"
    )
    assert got.data.dtype == expected.data.dtype and tuple(got.data.shape) == tuple(expected.data.shape), (
        f"data tensor changed: {got.data.dtype} {tuple(got.data.shape)} != "
        f"{expected.data.dtype} {tuple(expected.data.shape)}{where}"
    )
    assert bits(got.data) == bits(expected.data), f"bytes differ{where}"
