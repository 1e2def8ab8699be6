"""How a transformers model's KV cache maps to the engine's ``[2, layers, tokens, hidden]``.

A ``DynamicCache`` holds, per layer, keys and values shaped ``[batch, kv_heads, tokens,
head_dim]``. The engine wants one tensor per prompt with K and V stacked first and the
heads folded into ``hidden = kv_heads * head_dim``, so that a chunk is a slice on dim 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvstacks.errors import InvalidInput
from kvstacks.memory import KV_DTYPES


class UnsupportedModel(InvalidInput):
    """The model's cache is not one full-attention K/V pair per layer."""


@dataclass(frozen=True)
class KVLayout:
    """The shape of one token's KV in a model: what the engine's tensors must match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_dim

    def bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V of one token across all layers."""
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.hidden * element

    @classmethod
    def from_model(cls, model: Any) -> KVLayout:
        """Read the layout from ``model.config`` (and the dtype from its weights).

        Refuses models whose cache is not a full K/V per layer for every token (sliding
        window or hybrid attention, state-space layers, KV shared across layers): caching
        a prefix of those needs more than a K/V slice.
        """
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        name = type(model).__name__
        layer_types = getattr(text, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            kinds = sorted(set(layer_types))
            raise UnsupportedModel(
                f"{name} mixes attention kinds {kinds}; kvstacks-transformers caches only models whose "
                "every layer is full attention"
            )
        if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            raise UnsupportedModel(
                f"{name} uses sliding-window attention (sliding_window={text.sliding_window}); "
                "its cache drops old tokens, so a stored prefix cannot be rebuilt"
            )
        if getattr(text, "num_kv_shared_layers", 0):
            raise UnsupportedModel(f"{name} shares KV across layers; not supported")
        try:
            layers = int(text.num_hidden_layers)
            heads = int(text.num_attention_heads)
        except AttributeError as exc:
            raise UnsupportedModel(
                f"{name}'s config has no {exc.name!r}; is it a decoder-only transformer?"
            ) from exc
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        if dtype not in KV_DTYPES:
            raise UnsupportedModel(f"{name} computes in {dtype}; kvstacks stores float16, bfloat16 or float32 KV")
        return cls(layers, kv_heads, int(head_dim), dtype)

    def check_kv(self, kv: torch.Tensor) -> None:
        """Raise if ``kv`` (from the engine) was not made by a model of this layout."""
        if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != self.num_layers or kv.shape[3] != self.hidden:
            raise InvalidInput(
                f"the stack returned KV shaped {tuple(kv.shape)} but this model needs "
                f"[2, {self.num_layers}, tokens, {self.hidden}]: the stack holds another model's KV; "
                "give each model its own `model:` name in the stack config"
            )

    def cache_to_kv(self, cache: Any, end: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy the first ``end`` tokens of a ``DynamicCache`` (batch 1) into a new ``[2, L, T, hidden]``."""
        layers = cache.layers
        if len(layers) != self.num_layers:
            raise UnsupportedModel(f"the cache has {len(layers)} layers, the model config says {self.num_layers}")
        first = layers[0].keys
        if first is None or first.dim() != 4:
            raise UnsupportedModel("the cache's layers hold no [batch, heads, tokens, head_dim] keys")
        if first.shape[0] != 1:
            raise InvalidInput(f"prefix caching works on one sequence at a time, got a batch of {first.shape[0]}")
        length = first.shape[2] if end is None else end
        out = torch.empty(
            (2, self.num_layers, length, self.num_kv_heads, self.head_dim), dtype=dtype or self.dtype
        )
        for i, layer in enumerate(layers):
            for j, tensor in enumerate((layer.keys, layer.values)):
                if tensor.shape[1:] != (self.num_kv_heads, tensor.shape[2], self.head_dim) or tensor.shape[2] < length:
                    raise UnsupportedModel(
                        f"layer {i} caches {'KV'[j]} shaped {tuple(tensor.shape)}, expected "
                        f"[1, {self.num_kv_heads}, >={length}, {self.head_dim}] from the model config"
                    )
                # [1, heads, T, dim] -> [T, heads, dim]: the copy does the transpose.
                out[j, i].copy_(tensor[0, :, :length].transpose(0, 1))
        return out.view(2, self.num_layers, length, self.hidden)

    def kv_to_cache(self, kv: torch.Tensor, device: torch.device | str = "cpu") -> Any:
        """A new ``DynamicCache`` holding ``kv`` ``[2, L, T, hidden]``, in the model's dtype and on ``device``."""
        from transformers import DynamicCache

        self.check_kv(kv)
        tokens = kv.shape[2]
        heads = kv.reshape(2, self.num_layers, tokens, self.num_kv_heads, self.head_dim)
        # One transposing copy of everything into [layers, K/V, 1, heads, T, dim]: several times
        # faster than a copy per layer, which pays for a fresh allocation each time.
        staged = torch.empty(
            (self.num_layers, 2, 1, self.num_kv_heads, tokens, self.head_dim), dtype=self.dtype, device=device
        )
        staged.copy_(heads.permute(1, 0, 3, 2, 4).unsqueeze(2))
        cache = DynamicCache()
        for i in range(self.num_layers):
            keys, values = staged[i, 0], staged[i, 1]
            # update() with no tokens creates the layer; the layer then takes the slices as they are,
            # since update() would copy them again by concatenation.
            cache.update(keys[:, :, :0], values[:, :, :0], i)
            layer = cache.layers[i]
            layer.keys, layer.values = keys, values
        if cache.get_seq_length() != tokens:  # a transformers whose layers keep KV elsewhere
            cache = DynamicCache()
            for i in range(self.num_layers):
                cache.update(staged[i, 0], staged[i, 1], i)
        return cache
