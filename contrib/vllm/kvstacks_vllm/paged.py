"""vLLM's paged KV, per layer, mapped to kvstacks chunks ``[2, layers, tokens, heads * head_size]``.

A token's K (or V) lives in block ``block_ids[p // block_size]`` at offset ``p % block_size``.
Each copy goes straight between the paged cache and the engine's chunk layout (one
indexed copy per layer and K/V): the two layouts differ (vLLM's CPU blocks are head-major
inside a block and tiled by the attention kernel, chunks token-major), so one copy each way
is the least there is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedLayout(ValueError):
    """A KV cache tensor shape this connector does not know how to read."""


@dataclass(frozen=True)
class Tiles:
    """Where a CPU attention kernel puts K (or V) inside one (block, head) region.

    Token ``t`` splits into ``T = t // t_lo`` and ``t % t_lo``, dimension ``d`` into
    ``D = d // d_lo`` and ``d % d_lo``; ``order`` is the memory order of those four axes
    (``T``, ``t``, ``D``, ``d``), outermost first.
    """

    t_lo: int
    d_lo: int
    order: str

    def view(self, region: torch.Tensor, block_size: int, head_size: int) -> torch.Tensor:
        """``region`` ``[blocks, heads, block_size * head_size]`` as ``[blocks, heads, T, t, D, d]``."""
        if block_size % self.t_lo or head_size % self.d_lo:
            raise UnsupportedLayout(f"block_size {block_size} / head_size {head_size} do not tile as {self}")
        size = {"T": block_size // self.t_lo, "t": self.t_lo, "D": head_size // self.d_lo, "d": self.d_lo}
        tiled = region.unflatten(2, [size[axis] for axis in self.order])
        return tiled.permute(0, 1, *(2 + self.order.index(axis) for axis in "TtDd"))


# vLLM 0.32's CPU kernels (vllm.v1.attention.backends.cpu_attn, ops.cpu_attn_reshape_and_cache),
# as measured for bf16/fp16/fp32, block sizes 16-256, head sizes 32-256 (see the unit tests):
# "vec" and "vec16" keep K transposed ([head_size, block_size]: keys are read dimension by
# dimension) then V ([block_size, head_size]). "amx" lays both out for its bf16 tile multiply:
# K as 16-token tiles of dimension pairs, V as 16-dimension tiles of token pairs.
VEC = (Tiles(1, 1, "DTdt"), Tiles(1, 1, "TDtd"))
CPU_TILES = {"vec": VEC, "vec16": VEC, "amx": (Tiles(16, 2, "TDtd"), Tiles(2, 16, "DTdt"))}


@dataclass
class LayerKV:
    """One layer's K and V as ``[blocks, heads, T, t, D, d]`` views (see :class:`Tiles`).

    Token ``offset`` of a block is ``[..., offset // t, offset % t, :, :]``; flattening the
    last two axes gives its ``head_size`` values in order. Untiled layouts have ``t = d = 1``.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def from_cache(cls, cache: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int,
                   isa: str = "vec") -> LayerKV:
        """Map one layer's cache tensor; ``isa`` is the CPU attention kernel vLLM runs on it.

        ISAs other than those in :data:`CPU_TILES` (neon, vsx, ...) are taken to keep the vec
        layout, unverified: the worker checks with :mod:`kvstacks_vllm.probe` before any load.
        """
        shape = tuple(cache.shape)
        if cache.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_size):
            # vLLM's CPU backend: [blocks, heads, block_size, 2 * head_size] whose memory is,
            # per block and head, K's region then V's, each tiled as the kernel wants.
            both = cache.view(shape[0], num_kv_heads, 2, block_size * head_size)
            k_tiles, v_tiles = CPU_TILES.get(isa, VEC)
            return cls(k_tiles.view(both[:, :, 0], block_size, head_size),
                       v_tiles.view(both[:, :, 1], block_size, head_size))
        if cache.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_size):
            # [2, blocks, block_size, heads, head_size] (flash-attention style): token-major blocks.
            k, v = (cache[i].transpose(1, 2)[:, :, :, None, :, None] for i in range(2))
            return cls(k, v)
        raise UnsupportedLayout(
            f"kvstacks-vllm does not know this KV cache layout: shape {shape} for block_size {block_size}, "
            f"{num_kv_heads} KV heads of size {head_size}; supported: vLLM's CPU backend "
            "[blocks, heads, block_size, 2*head_size] and [2, blocks, block_size, heads, head_size]"
        )


class PagedKV:
    """Every layer's paged KV, in model order, and the copies between it and chunk tensors."""

    def __init__(self, layers: list[LayerKV], block_size: int, num_kv_heads: int, head_size: int) -> None:
        self.layers = layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.dtype = layers[0].k.dtype

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_size

    def _index(self, block_ids: list[int], start: int, end: int) -> list[tuple]:
        """For K and V: the index of tokens ``[start, end)`` into every layer's view."""
        positions = torch.arange(start, end)
        blocks = torch.as_tensor(block_ids, dtype=torch.long)[positions // self.block_size]
        offsets = positions % self.block_size
        first = self.layers[0]  # all layers share one layout
        return [(blocks, slice(None), offsets // part.shape[3], offsets % part.shape[3]) for part in (first.k, first.v)]

    def gather(self, block_ids: list[int], start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Tokens ``[start, end)`` into ``out[:, :, : end - start]``, ``out`` being ``[2, layers, >=n, hidden]``."""
        n = end - start
        index = self._index(block_ids, start, end)
        for i, layer in enumerate(self.layers):
            for j, part in enumerate((layer.k, layer.v)):
                # Advanced indices around a slice put the token dimension first: [n, heads, D, d].
                out[j, i, :n].copy_(part[index[j]].flatten(1))
        return out[:, :, :n]

    def scatter(self, block_ids: list[int], start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (``[2, layers, n, hidden]``) into tokens ``[start, start + n)``."""
        index = self._index(block_ids, start, start + kv.shape[2])
        for i, layer in enumerate(self.layers):
            for j, part in enumerate((layer.k, layer.v)):
                part[index[j]] = kv[j, i].unflatten(1, (self.num_kv_heads, *part.shape[4:]))
