"""cachegen on real KV of SmolLM2-135M: perplexity with teacher forcing stays close to full precision."""

from __future__ import annotations

import math

import pytest
import torch
from kvstacks.testing import require
from kvstacks_cachegen.compressor import CacheGenCompressor

transformers_integration = require("kvstacks_transformers", "pip install -e contrib/transformers")
KVLayout, cache_argument = transformers_integration.KVLayout, transformers_integration.cache_argument

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEXT = (
    "The lighthouse keeper kept a logbook on the table by the stairs. Every evening he wrote down the wind, "
    "the state of the sea and the ships that passed, and every morning he read the previous entry before he "
    "climbed up to clean the lens. The work was slow and repetitive, but he liked the order of it. When a storm "
    "came in from the west he stayed awake all night, trimming the wick and listening to the waves break on the "
    "rocks below, and in the morning he wrote that the light had not failed. Years later, when the lamp was "
    "replaced by an automatic beacon, the logbooks were sent to a museum in the town, where children read them "
    "and tried to imagine a whole life measured in tides, oil and weather. Some of them asked whether he had been "
    "lonely. The curator always answered that he had written about the sea the way other people write about a "
    "friend, and that the last entry, in a steady hand, simply said that the night had been calm and the light "
    "had burned until dawn."
)


@pytest.fixture(scope="module")
def model_and_ids(smollm2):
    model, tok = smollm2  # shared with the transformers tests: loaded once per session
    return model, tok(TEXT, return_tensors="pt").input_ids


def perplexity(model, ids: torch.Tensor, kv: torch.Tensor, split: int) -> tuple[float, torch.Tensor]:
    cache = KVLayout.from_model(model).kv_to_cache(kv)
    with torch.no_grad():
        logits = model(ids[:, split:-1], use_cache=True, **{cache_argument(model): cache},
                       position_ids=torch.arange(split, ids.shape[1] - 1)[None]).logits[0]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, split + 1:])
    return math.exp(nll.item()), logits.argmax(-1)


def test_default_level_keeps_perplexity(model_and_ids):
    model, ids = model_and_ids
    split = 128
    with torch.no_grad():
        cache = model(ids[:, :split], use_cache=True).past_key_values
    kv = KVLayout.from_model(model).cache_to_kv(cache, dtype=torch.float16)
    base, base_top = perplexity(model, ids, kv, split)

    def through(options: dict) -> tuple[float, float]:
        c = CacheGenCompressor(CacheGenCompressor.Options(workers=0, **options))
        payload = bytes(c.compress(kv))
        decoded = c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
        ppl, top = perplexity(model, ids, decoded, split)
        return ppl, float((top == base_top).float().mean())

    ppl, agree = through({})
    # 1.5% of perplexity on 78 scored tokens (measured: 31.59 -> 31.53, top-1 0.95; a 4-bin,
    # no-sink cache gives 131.7); the benchmark measures +0.06 on 1,202 tokens
    assert abs(ppl - base) <= 0.015 * base, (base, ppl)
    assert agree >= 0.9
    crude, _ = through({"bins": [4], "sinks": "never"})
    assert crude - base > abs(ppl - base), "a crude 4-bin cache must hurt more (the test can tell them apart)"


def test_fit_from_the_model_writes_tables_that_code_its_kv(smollm2, model_and_ids, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from kvstacks_cachegen.cli import cachegen
    from kvstacks_cachegen.compressor import FLAG_TABLES, HEADER
    from kvstacks_cachegen.tables import load_tables

    # `fit --model smollm2` loads the model through kvstacks-transformers: hand it the session's copy.
    monkeypatch.setattr("kvstacks_transformers.smollm2.load_smollm2", lambda progress=True: smollm2)
    sample = tmp_path / "sample.txt"
    sample.write_text(TEXT)
    out = tmp_path / "smollm2.json"
    result = CliRunner().invoke(cachegen, ["fit", "--model", "smollm2", "--text", str(sample), "--out", str(out),
                                           "--chunk-size", "64"])
    assert result.exit_code == 0, result.output
    tables = load_tables(out)
    model, ids = model_and_ids
    layout = KVLayout.from_model(model)
    assert (tables.layers, tables.hidden) == (layout.num_layers, layout.num_kv_heads * layout.head_dim)
    with torch.no_grad():
        cache = model(ids[:, :192], use_cache=True).past_key_values
    kv = layout.cache_to_kv(cache, dtype=torch.float16)[:, :, 64:]
    fitted = CacheGenCompressor(CacheGenCompressor.Options(workers=0, tables=out))
    payload = bytes(fitted.compress(kv))
    assert HEADER.unpack_from(payload)[4] & FLAG_TABLES, "chunks of the fitted model are coded with its tables"
    plain = bytes(CacheGenCompressor(CacheGenCompressor.Options(workers=0)).compress(kv))
    # Per-chunk tables code each stream at its entropy, so tables fitted even on this very text
    # save nothing here (measured: 0.02% bigger); they must work and cost next to nothing.
    assert len(payload) < 1.005 * len(plain)
    decoded = fitted.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    assert (decoded.float() - kv.float()).abs().mean() < 0.1 * kv.float().abs().mean()
