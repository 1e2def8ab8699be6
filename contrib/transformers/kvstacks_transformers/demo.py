"""``kvstacks demo``: time to first token of one long prompt, cold and warm from each tier.

The stack is the embedded default (CPU memory over a disk folder; no servers). The
prompt runs once cold (nothing cached: the whole prompt is computed, then stored), then
again warm from the CPU tier, then warm from disk alone after the CPU tier is emptied, as
after a restart of the process. The first token must be the same every time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvstacks_transformers.prefix_cache import PrefillResult, PrefixCachedLM, cache_argument

DEFAULT_PROMPT_TOKENS = 2000


def default_stack(model_name: str, cache_dir: Path | str, cpu: str = "4GiB", disk: str = "20GiB") -> dict[str, Any]:
    """The embedded default: CPU memory over a disk folder."""
    return {
        "model": model_name,
        "chunk_size": 256,
        "stack": [
            {"backend": "cpu", "capacity": cpu},
            {"backend": "disk", "path": str(cache_dir), "capacity": disk},
        ],
    }


def drop_page_cache(folder: Path | str) -> int:
    """Ask the OS to forget the cached pages of every file under ``folder``; return files done.

    Only this folder's files are affected (``posix_fadvise``, no root needed), so the next
    read comes from the device. Returns 0 where the call does not exist.
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    done = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                done += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return done


def warm_up(model: Any) -> None:
    """Small forward passes, without and with a cache, so one-time setup is charged to no run."""
    device = next(model.parameters()).device
    ids = torch.arange(100, 164).unsqueeze(0).to(device)
    name = cache_argument(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: out.past_key_values})
        model(input_ids=ids[:, :1], use_cache=True, logits_to_keep=1, **{name: out.past_key_values})


def wait_for_offloads(engine: Any, timeout: float = 120.0) -> None:
    """Block until the writes queued for lower tiers are done."""
    if not engine.flush(timeout):
        raise RuntimeError(f"offloads to the lower tiers did not finish in {timeout:.0f} s")


def runs_of(runs: int, setup: Callable[[], object], run: Callable[[], PrefillResult]) -> list[PrefillResult]:
    """``run()`` ``runs`` times, each after ``setup()``."""
    results = []
    for _ in range(runs):
        setup()
        results.append(run())
    return results


def run_demo(
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    cache_dir: Path | str | None = None,
    repeats: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure and return the demo's figures (see ``docs/transformers.md``)."""
    from kvstacks import CacheEngine

    from kvstacks_transformers.long_text import prompt_ids
    from kvstacks_transformers.smollm2 import MODEL_NAME, load_smollm2

    echo("loading SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) ...")
    started = time.perf_counter()
    model, tokenizer = load_smollm2(progress=progress)
    load_s = time.perf_counter() - started
    context = model.config.max_position_embeddings
    if not 2 <= prompt_tokens <= context:
        raise ValueError(f"--tokens must be between 2 and the model's context, {context}; got {prompt_tokens}")
    ids = torch.tensor(prompt_ids(tokenizer, prompt_tokens))

    with tempfile.TemporaryDirectory(prefix="kvstacks-demo-") as scratch:
        folder = Path(cache_dir) if cache_dir is not None else Path(scratch)
        engine = CacheEngine.from_config(default_stack(f"{MODEL_NAME}-fp32", folder))
        try:
            lm = PrefixCachedLM(model, engine)
            warm_up(model)
            warm_runs = max(3, repeats)

            echo(f"cold: computing all {prompt_tokens} prompt tokens ...")

            def cold_setup() -> None:
                engine.clear()

            cold = runs_of(repeats, cold_setup, lambda: lm.prefill(ids))
            wait_for_offloads(engine)
            stored = {name: s["bytes"] for name, s in engine.stats().items()}

            echo("warm: from the CPU tier ...")
            cpu = runs_of(warm_runs, lambda: None, lambda: lm.prefill(ids))

            echo("warm: from disk alone (CPU tier emptied) ...")
            disk = runs_of(warm_runs, lambda: engine.clear(tier="cpu"), lambda: lm.prefill(ids))

            def cold_disk_setup() -> None:
                engine.clear(tier="cpu")
                drop_page_cache(folder)

            disk_uncached = runs_of(warm_runs, cold_disk_setup, lambda: lm.prefill(ids))
        finally:
            engine.close()

    runs = {"cold": cold, "cpu": cpu, "disk": disk, "disk_uncached": disk_uncached}
    ttft = {mode: statistics.median(r.ttft_s for r in results) for mode, results in runs.items()}
    first = {mode: [int(r.next_token_logits.argmax()) for r in results] for mode, results in runs.items()}
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft,
        "speedup": {mode: ttft["cold"] / ttft[mode] for mode in runs if mode != "cold"},
        "cached_tokens": {mode: results[-1].cached_tokens for mode, results in runs.items()},
        "computed_tokens": {mode: results[-1].computed_tokens for mode, results in runs.items()},
        "retrieve_s": {mode: statistics.median(r.retrieve_s for r in results) for mode, results in runs.items()},
        "store_s": statistics.median(r.store_s for r in cold),
        "stored_bytes": stored,
        "kv_bytes_per_token": lm.layout.bytes_per_token(lm.kv_dtype),
        "same_first_token": len({t for tokens in first.values() for t in tokens}) == 1,
        "first_token": tokenizer.decode([first["cold"][0]]),
        "repeats": {"cold": repeats, "warm": warm_runs},
        "model": MODEL_NAME,
        "model_load_s": load_s,
        "torch_threads": torch.get_num_threads(),
    }


ROWS = (
    ("cold", "cold: no cache, whole prompt computed"),
    ("cpu", "warm from CPU tier"),
    ("disk", "warm from disk alone"),
    ("disk_uncached", "  the same, page cache dropped"),
)


def render(result: dict[str, Any]) -> str:
    """The human-readable table."""
    n = result["prompt_tokens"]
    lines = [
        "",
        (f"time to first token, {result['model']}, prompt of {n} tokens "
         f"(median of {result['repeats']['cold']} cold, {result['repeats']['warm']} warm runs)"),
        "",
        f"{'':42}{'TTFT':>10}{'speedup':>10}{'from cache':>12}{'computed':>10}",
    ]
    for mode, label in ROWS:
        speed = "1.0x" if mode == "cold" else f"{result['speedup'][mode]:.1f}x"
        lines.append(
            f"{label:42}{result['ttft_s'][mode]:>9.3f}s{speed:>10}"
            f"{result['cached_tokens'][mode]:>12}{result['computed_tokens'][mode]:>10}"
        )
    lines += ["", "bytes stored per tier:"]
    for tier, nbytes in result["stored_bytes"].items():
        lines.append(f"  {tier:<10}{nbytes / 2**20:>10.1f} MiB")
    lines.append(f"  ({result['kv_bytes_per_token']:,} bytes of KV a token)")
    lines.append(f"storing the cold run's KV took {result['store_s']:.3f}s, after its first token "
                 "(lower tiers are written in the background)")
    same = "yes" if result["same_first_token"] else "NO"
    lines.append(f"\nfirst token {result['first_token']!r}, the same in every run: {same}")
    return "\n".join(lines)
