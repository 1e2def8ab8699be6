"""The mapping between a DynamicCache and the engine's [2, layers, tokens, hidden]."""

from __future__ import annotations

import pytest
import torch
from kvstacks.errors import InvalidInput
from kvstacks.testing import require
from kvstacks_transformers import KVLayout, UnsupportedModel


def forward_cache(model, tokens: int):
    ids = torch.arange(tokens).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True).past_key_values


def test_layout_is_read_from_the_model(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype) == (3, 2, 16, torch.float32)
    assert layout.hidden == 32
    assert layout.bytes_per_token() == 2 * 3 * 32 * 4
    assert layout.bytes_per_token(torch.float16) == 2 * 3 * 32 * 2


def test_cache_to_kv_puts_head_h_dim_d_at_h_times_head_dim_plus_d(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    cache = forward_cache(tiny_model, 10)
    kv = layout.cache_to_kv(cache)
    assert kv.shape == (2, 3, 10, 32)
    for layer in range(3):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        for token in (0, 9):
            assert torch.equal(kv[0, layer, token], keys[:, token, :].reshape(-1))
            assert torch.equal(kv[1, layer, token], values[:, token, :].reshape(-1))
        assert torch.equal(kv[0, layer, 3, 16:32], keys[1, 3])


def test_round_trip_is_exact_and_end_cuts_tokens(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    cache = forward_cache(tiny_model, 12)
    kv = layout.cache_to_kv(cache, end=7)
    assert kv.shape[2] == 7
    rebuilt = layout.kv_to_cache(kv)
    assert rebuilt.get_seq_length() == 7
    for old, new in zip(cache.layers, rebuilt.layers):
        assert torch.equal(new.keys, old.keys[:, :, :7])
        assert torch.equal(new.values, old.values[:, :, :7])
        assert new.keys.is_contiguous()


def test_cache_to_kv_converts_dtype(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    kv = layout.cache_to_kv(forward_cache(tiny_model, 5), dtype=torch.float16)
    assert kv.dtype == torch.float16
    assert layout.kv_to_cache(kv).layers[0].keys.dtype == torch.float32


def test_kv_of_another_layout_is_refused_with_the_fix(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    with pytest.raises(InvalidInput, match="another model's KV.*model:"):
        layout.kv_to_cache(torch.zeros(2, 4, 5, 32))
    with pytest.raises(InvalidInput, match=r"\[2, 3, tokens, 32\]"):
        layout.kv_to_cache(torch.zeros(2, 3, 5, 64))


def test_batches_are_refused(tiny_model):
    layout = KVLayout.from_model(tiny_model)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with torch.inference_mode():
        cache = tiny_model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(InvalidInput, match="one sequence at a time"):
        layout.cache_to_kv(cache)


def test_sliding_window_models_are_refused():
    transformers = require("transformers")
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
    )
    with pytest.raises(UnsupportedModel, match="sliding"):
        KVLayout.from_model(transformers.MistralForCausalLM(config))


def test_hybrid_attention_models_are_refused(tiny_model):
    class Hybrid:
        config = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "layer_types": None})
        dtype = torch.float32

    Hybrid.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModel, match="full attention"):
        KVLayout.from_model(Hybrid())
