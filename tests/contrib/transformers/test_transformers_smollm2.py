"""With the real SmolLM2-135M-Instruct: cached prefills give the logits and the text of full ones."""

from __future__ import annotations

import json

import pytest
import torch
from kvstacks_transformers import PrefixCachedLM
from kvstacks_transformers.long_text import prompt_ids

pytestmark = pytest.mark.model


def full_prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids.unsqueeze(0)).logits


def test_prompts_have_exactly_the_asked_length_and_are_deterministic(smollm2):
    _, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 700)
    assert len(ids) == 700
    assert ids == prompt_ids(tokenizer, 700)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>")  # the chat template's user turn
    assert "Operations Manual" in text and text.rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="too short"):
        prompt_ids(tokenizer, 10)


def test_cached_prefill_logits_match_a_full_prefill_from_cpu_and_from_disk(smollm2, make_engine):
    model, tokenizer = smollm2
    engine = make_engine(model="smollm2", chunk_size=64, disk=True)
    lm = PrefixCachedLM(model, engine)
    ids = torch.tensor(prompt_ids(tokenizer, 300))
    expected = full_prefill_logits(model, ids)

    cold = lm.prefill(ids)
    assert cold.cached_tokens == 0
    torch.testing.assert_close(cold.next_token_logits, expected[:, -1], rtol=1e-4, atol=1e-3)

    from_cpu = lm.prefill(ids)
    assert (from_cpu.cached_tokens, from_cpu.computed_tokens) == (299, 1)
    torch.testing.assert_close(from_cpu.next_token_logits, expected[:, -1], rtol=1e-4, atol=1e-3)

    assert engine.offloader.drain(60)
    engine.clear(tier="cpu")
    from_disk = lm.prefill(ids)
    assert from_disk.cached_tokens == 299
    torch.testing.assert_close(from_disk.next_token_logits, expected[:, -1], rtol=1e-4, atol=1e-3)

    # A longer prompt reuses the whole chunks and computes the rest: every computed position matches.
    longer = torch.cat([ids, torch.tensor(tokenizer("Answer in one sentence.")["input_ids"])])
    partial = lm.prefill(longer, all_logits=True)
    assert partial.cached_tokens == 256
    torch.testing.assert_close(
        partial.logits, full_prefill_logits(model, longer)[:, 256:], rtol=1e-4, atol=1e-3
    )


def test_greedy_generation_is_identical_with_and_without_the_cache(smollm2, make_engine):
    model, tokenizer = smollm2
    lm = PrefixCachedLM(model, make_engine(model="smollm2-gen", chunk_size=64))
    ids = torch.tensor(prompt_ids(tokenizer, 160))
    settings = {"max_new_tokens": 10, "do_sample": False}
    with torch.inference_mode():
        plain = model.generate(ids.unsqueeze(0), attention_mask=torch.ones(1, 160, dtype=torch.long), **settings)
    cold = lm.generate(ids, **settings)
    warm = lm.generate(ids, **settings)
    assert lm.last_use.cached_tokens == 159
    assert tokenizer.decode(warm[0, 160:]) == tokenizer.decode(plain[0, 160:])
    assert torch.equal(cold, plain) and torch.equal(warm, plain)


def test_demo_json_is_the_last_line_and_every_run_agrees(smollm2, monkeypatch, tmp_path):
    import kvstacks_transformers.smollm2
    from click.testing import CliRunner
    from kvstacks_transformers.demo import render
    from kvstacks_transformers.plugin import demo

    monkeypatch.setattr(kvstacks_transformers.smollm2, "load_smollm2", lambda progress=True: smollm2)
    result = CliRunner().invoke(demo, ["--tokens", "200", "--json", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["prompt_tokens"] == 200
    assert set(report["ttft_s"]) >= {"cold", "cpu", "disk"}
    assert report["cached_tokens"] == {"cold": 0, "cpu": 199, "disk": 199, "disk_uncached": 199}
    assert report["same_first_token"] is True
    assert report["stored_bytes"]["cpu"] == report["stored_bytes"]["disk"] == 199 * 46080
    assert list((tmp_path / "cache").rglob("*")), "the disk tier wrote nothing"

    table = render(report)
    for label in ("cold", "warm from CPU tier", "warm from disk alone", "speedup", "bytes stored per tier"):
        assert label in table
    assert "the same in every run: yes" in table


def test_demo_refuses_a_prompt_longer_than_the_context(smollm2, monkeypatch):
    import kvstacks_transformers.smollm2
    from click.testing import CliRunner
    from kvstacks_transformers.plugin import demo

    monkeypatch.setattr(kvstacks_transformers.smollm2, "load_smollm2", lambda progress=True: smollm2)
    result = CliRunner().invoke(demo, ["--tokens", "9000"])
    assert result.exit_code != 0
    assert "8192" in result.output and "Traceback" not in result.output
