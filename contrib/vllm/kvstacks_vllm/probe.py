"""Check with vLLM's own cache-writing kernel that :class:`PagedKV` reads and writes vLLM's CPU blocks right.

vLLM's CPU attention kernels keep their own layout inside a block, one per ISA
(:data:`kvstacks_vllm.paged.CPU_TILES`), and it is theirs to change. Whole blocks copy back
intact under any reading, but a load that ends inside a block, which most do, would put
some tokens' KV in the wrong place under a wrong one: a wrong answer, silently. So before
the worker loads anything it writes one probe block with the kernel vLLM will use, reads
every token back and writes them all into an empty block, which must come out the same.
"""

from __future__ import annotations

import torch

from kvstacks_vllm.paged import LayerKV, PagedKV


def cpu_attn_isa(dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto") -> str:
    """The CPU attention kernel ("amx", "vec", "vec16", ...) vLLM runs for this cache."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)


def cpu_layout_matches(block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, isa: str) -> bool:
    """Whether each token ``isa``'s cache kernel writes into a block gathers, and scatters, as itself."""
    from vllm import _custom_ops as ops

    def written(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        cache = torch.zeros((1, num_kv_heads, block_size, 2 * head_size), dtype=dtype)
        key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                       torch.arange(block_size, dtype=torch.int64), isa)
        return cache

    def paged(cache: torch.Tensor) -> PagedKV:
        layer = LayerKV.from_cache(cache, block_size, num_kv_heads, head_size, isa)
        return PagedKV([layer], block_size, num_kv_heads, head_size)

    # Small integers are exact in every KV dtype; K and V, tokens, heads and dims all differ.
    ramp = torch.arange(block_size * num_kv_heads * head_size).view(block_size, num_kv_heads, head_size)
    key, value = (ramp % 251).to(dtype), (-(ramp * 7 % 241) - 1).to(dtype)
    cache = written(key, value)
    kv = paged(cache).gather([0], 0, block_size, torch.empty((2, 1, block_size, num_kv_heads * head_size), dtype=dtype))
    empty = torch.zeros_like(cache)
    paged(empty).scatter([0], 0, kv)
    return torch.equal(kv[0, 0], key.flatten(1)) and torch.equal(kv[1, 0], value.flatten(1)) and torch.equal(empty, cache)
