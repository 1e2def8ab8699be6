"""MemoryObj: one chunk's KV, raw or compressed, with what is needed to decode it."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kvstacks.errors import InvalidInput
from kvstacks.keys import CacheKey

#: dtypes a chunk may hold, and their one-byte codes in the chunk format.
DTYPES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.uint8: 4, torch.int8: 5}
DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPES.items()}
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(eq=False, slots=True)
class MemoryObj:
    """A chunk as a tier holds it.

    ``data`` is the KV tensor ``shape``/``dtype`` itself when ``compressor`` is
    ``"none"``, else a 1-D uint8 tensor of the compressor's payload. ``shape`` and
    ``dtype`` always describe the decoded KV ``[2, layers, tokens, hidden]``.

    ``check``, when not None, is this object's frame checksum (``kvstacks.frame``: xxh3_64
    of its header and payload), computed by whoever last wrote ``data`` while the bytes
    were still in the cache (the cpu tier, as it copies a chunk in). Every tier that
    writes the object's frame uncompressed sends it instead of reading the payload again.
    Whoever changes ``data``'s bytes (or hands its buffer to someone who may) sets it to
    None. A wrong value is still safe: the frame then fails its check on read, a miss
    counted corrupt, never wrong bytes served.
    """

    key: CacheKey
    data: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    compressor: str = "none"
    check: int | None = None

    @classmethod
    def from_kv(cls, key: CacheKey, kv: torch.Tensor) -> MemoryObj:
        return cls(key, kv, tuple(kv.shape), kv.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes this object occupies as stored (after compression)."""
        return self.data.numel() * self.data.element_size()

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the decoded KV."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def payload(self) -> memoryview:
        """The stored bytes, without a copy."""
        data = self.data if self.data.is_contiguous() else self.data.contiguous()
        return memoryview(data.view(torch.uint8).reshape(-1).numpy())

    def payload_runs(self, min_run: int = 1 << 16) -> list[memoryview]:
        """The stored bytes in order, as views of the tensor's contiguous runs: no copy.

        A chunk sliced out of a longer KV (``kv[:, :, a:b]``) is not contiguous, but each
        of its ``[k/v, layer]`` blocks is; a writer that gathers (``sendmsg``, ``writev``)
        sends those blocks as they lie instead of copying the chunk first. Runs shorter
        than ``min_run`` bytes would cost more in calls than the copy: then the payload is
        copied once into a single run, as ``payload`` does.
        """
        data = self.data
        if data.is_contiguous():
            return [self.payload()]
        runs = run_views(data, min_run)
        if runs is None:
            return [self.payload()]
        return [memoryview(view) for _, view in runs]


def run_views(data: torch.Tensor, min_run: int = 1 << 16) -> list[tuple[int, np.ndarray]] | None:
    """``data``'s contiguous runs in order as (address, uint8 array over the run's bytes), for
    reading or writing them in place; None when runs are shorter than ``min_run`` bytes."""
    runs = run_offsets(data, min_run)
    if runs is None:
        return None
    size, offsets = runs
    # one array over the span the runs lie in, sliced per run (far cheaper than a tensor per run)
    span = torch.as_strided(data, (offsets[-1] + size,), (1,)).view(torch.uint8).numpy()
    base, width = data.data_ptr(), data.element_size()
    return [(base + o * width, span[o * width : (o + size) * width]) for o in offsets]


def run_offsets(data: torch.Tensor, min_run: int = 1 << 16) -> tuple[int, list[int]] | None:
    """``data``'s contiguous runs as (elements per run, each run's offset in elements from
    ``data.data_ptr()``), in order; None when runs are shorter than ``min_run`` bytes."""
    if data.is_contiguous():
        return data.numel(), [0]
    # the trailing dimensions laid out contiguously (a dimension of 1 has any stride)
    split, inner = data.dim(), 1
    for d in range(data.dim() - 1, -1, -1):
        if data.shape[d] != 1 and data.stride(d) != inner:
            break
        inner *= data.shape[d]
        split = d
    if inner * data.element_size() < min_run:
        return None
    strides = data.stride()[:split]
    return inner, [sum(i * st for i, st in zip(index, strides))
                   for index in itertools.product(*(range(n) for n in data.shape[:split]))]


def contiguous_runs(data: torch.Tensor, min_run: int = 1 << 16) -> list[torch.Tensor] | None:
    """``data``'s elements in order as contiguous tensors (views, no copy), or None when its
    contiguous runs are shorter than ``min_run`` bytes (then a gathering copy is cheaper)."""
    if data.is_contiguous():
        return [data]
    runs = run_offsets(data, min_run)
    if runs is None:
        return None
    size, offsets = runs
    flat = torch.as_strided(data, (offsets[-1] + size,), (1,))
    return [flat[o : o + size] for o in offsets]


def check_kv(kv: object, num_tokens: int | None = None) -> torch.Tensor:
    """Validate a KV tensor ``[2, layers, tokens, hidden]`` and return it."""
    if not isinstance(kv, torch.Tensor):
        raise InvalidInput(f"kv must be a torch.Tensor [2, layers, tokens, hidden], got {type(kv).__name__}")
    if kv.dim() != 4 or kv.shape[0] != 2:
        raise InvalidInput(
            f"kv must have shape [2, layers, tokens, hidden] (K and V stacked), got {tuple(kv.shape)}"
        )
    if kv.dtype not in KV_DTYPES:
        raise InvalidInput(f"kv dtype must be float16, bfloat16 or float32, got {kv.dtype}")
    if num_tokens is not None and kv.shape[2] != num_tokens:
        raise InvalidInput(
            f"kv holds {kv.shape[2]} tokens (dim 2) but {num_tokens} tokens were given; pass the KV of exactly these tokens"
        )
    return kv


def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Hand freed heap pages back to the system.

    Chunks are large and allocated from many threads: glibc keeps what they freed in
    per-thread arenas (and above its mmap threshold, which grows with each large free),
    so without this a closed engine's memory stayed in the process's RSS.
    """
    if _TRIM is not None:
        _TRIM(0)
