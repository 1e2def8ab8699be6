"""``kvstacks demo --engine vllm``: the demo's three cases in real vLLM, through KVStacksConnector.

One vLLM process stores the prompt's KV in the embedded default stack (CPU memory over a
disk folder) while computing it cold, then answers it again warm from the CPU tier; a
second vLLM process, started afterwards on the same folder, answers it warm from disk.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvstacks_vllm.model import build_model_folder
from kvstacks_vllm.ttft import run_in_process


def run_demo(prompt_tokens: int = 2000, cache_dir: Path | str | None = None, repeats: int = 1,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    if not 2 <= prompt_tokens <= 4000:
        raise ValueError(f"--tokens must be between 2 and 4000 with vLLM (max_model_len 4096); got {prompt_tokens}")
    echo("building or finding the SmolLM2 folder vLLM loads ...")
    model = str(build_model_folder())
    # vLLM's log outlives the demo's scratch folder when a vLLM process fails: the error names it.
    log = Path(tempfile.gettempdir()) / f"kvstacks-demo-vllm-{os.getpid()}.log"
    with tempfile.TemporaryDirectory(prefix="kvstacks-demo-vllm-") as scratch:
        folder = Path(cache_dir) if cache_dir is not None else Path(scratch) / "disk"
        if cache_dir is not None:
            empty_disk_tier(folder)  # chunks of an earlier demo would make the cold run warm
        spec = {"model": model, "disk": str(folder), "tokens": prompt_tokens, "repeats": max(3, repeats), "turns": 0}
        echo("vLLM process 1: cold (computed, then stored), then warm from the CPU tier "
             "(a vLLM engine takes a minute or more to start) ...")
        first = run_in_process("kvstacks-cpu", spec, log)
        echo("vLLM process 2, started afresh on the same folder: warm from disk ...")
        second = run_in_process("kvstacks-disk", spec, log)
    log.unlink(missing_ok=True)
    ttft = {"cold": first["first_s"], "cpu": first["warm_s"], "disk": second["warm_s"]}
    tokens = first["first_tokens"] + first["warm_tokens"] + second["warm_tokens"]
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft,
        "speedup": {mode: ttft["cold"] / ttft[mode] for mode in ("cpu", "disk")},
        "cached_tokens": {"cold": 0, "cpu": statistics.median(first["warm_hits"]),
                          "disk": statistics.median(second["warm_hits"])},
        "same_first_token": len(set(tokens)) == 1,
        "repeats": spec["repeats"],
        "engine_start_s": {"first": first["engine_start_s"], "second": second["engine_start_s"]},
    }


def empty_disk_tier(folder: Path) -> None:
    """Remove every chunk the disk tier keeps in ``folder`` (and nothing else there)."""
    from kvstacks import CacheEngine

    engine = CacheEngine.from_config({"stack": [{"backend": "disk", "path": str(folder), "capacity": "8GiB"}]})
    try:
        engine.clear()
    finally:
        engine.close()


def render(result: dict[str, Any]) -> str:
    n = result["prompt_tokens"]
    rows = (("cold", "cold: computed whole, then stored"), ("cpu", "warm from CPU tier (same process)"),
            ("disk", "warm from disk, a new vLLM process"))
    lines = ["", f"time to first token in vLLM, SmolLM2-135M bf16, {n}-token prompts (median of {result['repeats']})",
             "", f"{'':42}{'TTFT':>10}{'speedup':>10}{'from cache':>12}"]
    for mode, label in rows:
        speed = "1.0x" if mode == "cold" else f"{result['speedup'][mode]:.1f}x"
        lines.append(f"{label:42}{result['ttft_s'][mode]:>9.3f}s{speed:>10}{result['cached_tokens'][mode]:>12.0f}")
    same = "yes" if result["same_first_token"] else "no (bf16: a close call can flip; see docs/vllm.md)"
    lines.append(f"\nfirst token the same in every run: {same}")
    return "\n".join(lines)
