"""Chunk keys: a portable prefix-hash chain over token ids.

Chunk ``i``'s hash is ``xxh3_128(hash[i-1] || int32-LE tokens of chunk i || salt)``.
It depends on nothing but the tokens, the chunk size and the salt, so every
process, machine and the controller compute the same chain. Python's builtin
``hash`` is never used: it changes with ``PYTHONHASHSEED``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from kvstacks.errors import InvalidInput

ROOT = b"\x00" * 16
INT32_MAX = 2**31 - 1


class CacheKey(NamedTuple):
    """Where one chunk lives, independent of tier.

    A named tuple, so hashing and comparing (done a dozen times per chunk in the
    engine's bookkeeping) run in C. The tenant salt is folded into ``chunk_hash``,
    so keys of different tenants never collide and one tenant cannot probe
    another's prefixes.
    """

    model: str
    kv_format: str
    world_size: int
    rank: int
    chunk_hash: bytes

    def to_string(self) -> str:
        """Stable string form used by remote stores and on disk."""
        return f"{self.model}@{self.kv_format}@{self.world_size}@{self.rank}@{self.chunk_hash.hex()}"

    @classmethod
    def from_string(cls, text: str) -> CacheKey:
        try:
            model, kv_format, world_size, rank, digest = text.rsplit("@", 4)
            return cls(model, kv_format, int(world_size), int(rank), bytes.fromhex(digest))
        except ValueError as exc:
            raise InvalidInput(f"not a kvstacks key: {text!r}") from exc

    def __str__(self) -> str:
        return self.to_string()


def as_token_array(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate token ids and return them as little-endian int32."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise InvalidInput(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidInput(f"tokens must be integers, got a {tokens.dtype} tensor")
        array = tokens.detach().cpu().numpy()
    else:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise InvalidInput(f"tokens must be a flat list of ints, got {array.ndim} dimensions")
        if array.size and array.dtype.kind not in "iu":
            raise InvalidInput(
                f"tokens must be integers, got {array.dtype} values (e.g. {array.flat[0]!r})"
            )
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0:
            raise InvalidInput(f"tokens must be non-negative ids, got {low}")
        if high > INT32_MAX:
            raise InvalidInput(f"token id {high} does not fit in int32")
    return np.ascontiguousarray(array, dtype="<i4")


def chunk_bounds(num_tokens: int, chunk_size: int, partial: bool = True) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk; the last partial chunk only when ``partial``."""
    full = num_tokens // chunk_size
    bounds = [(i * chunk_size, (i + 1) * chunk_size) for i in range(full)]
    if partial and num_tokens % chunk_size:
        bounds.append((full * chunk_size, num_tokens))
    return bounds


def chunk_hashes(
    tokens: Sequence[int] | torch.Tensor | np.ndarray,
    chunk_size: int = 256,
    salt: bytes = b"",
    partial: bool = True,
) -> list[bytes]:
    """The prefix-hash chain of ``tokens``: one 16-byte digest per chunk."""
    return hash_chain(as_token_array(tokens), chunk_size, salt, partial)


def hash_chain(tokens: np.ndarray, chunk_size: int, salt: bytes = b"", partial: bool = True) -> list[bytes]:
    """``chunk_hashes`` for tokens already validated by ``as_token_array``."""
    data = tokens.tobytes()
    hashes: list[bytes] = []
    previous = ROOT
    for start, end in chunk_bounds(len(data) // 4, chunk_size, partial):
        h = xxhash.xxh3_128(previous)
        h.update(data[start * 4 : end * 4])
        h.update(salt)
        previous = h.digest()
        hashes.append(previous)
    return hashes
