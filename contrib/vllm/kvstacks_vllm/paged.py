"""vLLM's paged KV, per layer, mapped to kvstacks chunks ``[2, layers, tokens, heads * head_size]``.

A token's K (or V) lives in block ``block_ids[p // block_size]`` at offset ``p % block_size``.
Each copy goes straight between the paged cache and the engine's chunk layout (one
indexed copy per layer and K/V): the two layouts differ (vLLM's CPU blocks are head-major
inside a block and keep K transposed, chunks token-major), so one copy each way is the
least there is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedLayout(ValueError):
    """A KV cache tensor shape this connector does not know how to read."""


@dataclass
class LayerKV:
    """One layer's K and V as ``[blocks, heads, block_size, head_size]`` views (maybe strided)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def from_cache(cls, cache: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int) -> LayerKV:
        shape = tuple(cache.shape)
        if cache.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_size):
            # vLLM's CPU backend: [blocks, heads, block_size, 2 * head_size] whose memory is, per
            # block and head, K transposed ([head_size, block_size]: its attention kernel reads
            # keys dimension by dimension) then V ([block_size, head_size]). Whole blocks survive
            # any reading; a block loaded part-way needs the exact one (kvstacks_vllm.probe checks it).
            both = cache.view(shape[0], num_kv_heads, 2, block_size * head_size)
            k = both[:, :, 0].unflatten(2, (head_size, block_size)).transpose(2, 3)
            return cls(k, both[:, :, 1].unflatten(2, (block_size, head_size)))
        if cache.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_size):
            # [2, blocks, block_size, heads, head_size] (flash-attention style): token-major blocks.
            return cls(cache[0].transpose(1, 2), cache[1].transpose(1, 2))
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

    def _slots(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end)
        blocks = torch.as_tensor(block_ids, dtype=torch.long)[positions // self.block_size]
        return blocks, positions % self.block_size

    def gather(self, block_ids: list[int], start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Tokens ``[start, end)`` into ``out[:, :, : end - start]``, ``out`` being ``[2, layers, >=n, hidden]``."""
        n = end - start
        blocks, offsets = self._slots(block_ids, start, end)
        view = out[:, :, :n].unflatten(3, (self.num_kv_heads, self.head_size))
        for i, layer in enumerate(self.layers):
            # Advanced indices around a slice put the token dimension first: [n, heads, head_size].
            view[0, i].copy_(layer.k[blocks, :, offsets])
            view[1, i].copy_(layer.v[blocks, :, offsets])
        return out[:, :, :n]

    def scatter(self, block_ids: list[int], start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (``[2, layers, n, hidden]``) into tokens ``[start, start + n)``."""
        n = kv.shape[2]
        blocks, offsets = self._slots(block_ids, start, start + n)
        view = kv.unflatten(3, (self.num_kv_heads, self.head_size))
        for i, layer in enumerate(self.layers):
            layer.k[blocks, :, offsets] = view[0, i]
            layer.v[blocks, :, offsets] = view[1, i]
