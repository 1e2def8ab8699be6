"""Check with vLLM's own cache-writing kernel that :class:`LayerKV` reads vLLM's CPU blocks right.

vLLM's CPU attention kernels keep their own layout inside a block (the ``vec`` kernels keep K
transposed). Whole blocks copy back intact under any reading, but a load that ends inside a
block, which most do, would put some tokens' KV in the wrong place under a wrong one: a
wrong answer, silently. So before the worker loads anything it writes one probe block with
the kernel vLLM will use and reads every token back through :class:`LayerKV`.
"""

from __future__ import annotations

import torch

from kvstacks_vllm.paged import LayerKV


def cpu_layout_matches(block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                       kv_cache_dtype: str = "auto") -> bool:
    """Whether each token vLLM's CPU kernel writes into a block reads back as itself."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)
    cache = torch.zeros((1, num_kv_heads, block_size, 2 * head_size), dtype=dtype)
    key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    # Small integers are exact in every KV dtype; K and V, tokens, heads and dims all differ.
    shape = (block_size, num_kv_heads, head_size)
    ramp = torch.arange(block_size * num_kv_heads * head_size).view(shape)
    key = (ramp % 251).to(dtype)
    value = (-(ramp * 7 % 241) - 1).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                   torch.arange(block_size, dtype=torch.int64), isa)
    layer = LayerKV.from_cache(cache, block_size, num_kv_heads, head_size)
    # layer.k[0] is [heads, block_size, head_size]; what was written is [block_size, heads, head_size].
    return torch.equal(layer.k[0].transpose(0, 1), key) and torch.equal(layer.v[0].transpose(0, 1), value)
