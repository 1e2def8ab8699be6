"""Run by test_memory_soak.py in a fresh process: eight threads store and retrieve on a tiny
stack; prints RSS figures as JSON. Not a test module itself (no test_ prefix)."""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import torch
from kvstacks import CacheEngine

CHUNK_TOKENS, LAYERS, HIDDEN, PROMPT_CHUNKS = 256, 4, 64, 4  # 256 KiB chunks, 1 MiB prompts
MiB = 1 << 20
EXTRA: dict = {}


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(root: str, mode: str, seconds: float, threads: int = 8) -> dict:
    config = {"model": f"soak-{mode}", "chunk_size": CHUNK_TOKENS, "write_mode": mode, **EXTRA, "stack": [
        {"backend": "cpu", "capacity": "3MiB"}, {"backend": "disk", "path": f"{root}/{mode}", "capacity": "12MiB"}]}
    tokens_per_prompt = CHUNK_TOKENS * PROMPT_CHUNKS
    kv = torch.randn(2, LAYERS, tokens_per_prompt, HIDDEN).half()
    engine = CacheEngine.from_config(config)
    peak = [0]
    errors: list[str] = []

    def work(seed: int, until: float) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < until:
                p = rng.randrange(64)  # 64 MiB of prompts over 15 MiB of tiers: constant eviction
                tokens = list(range(p * 100_000, p * 100_000 + tokens_per_prompt))
                engine.store(tokens, kv)
                out, n = engine.retrieve(tokens)
                if n and not torch.equal(out, kv[:, :, :n]):
                    errors.append("retrieve returned other data")
                peak[0] = max(peak[0], rss())
        except Exception as exc:  # reported, not swallowed
            errors.append(repr(exc))

    def run(duration: float) -> None:
        until = time.monotonic() + duration
        pool = [threading.Thread(target=work, args=(i, until)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    run(0.5)  # warm-up: thread stacks, code paths, the allocator's first arenas
    engine.flush(30)
    before = rss()
    peak[0] = before
    run(seconds)
    engine.flush(30)
    stats = engine.stats()
    pool = engine.tier("cpu").backend.pool_stats()
    held = sum(size for _, size in engine.tier("cpu").backend.keys_now())
    disk_idle = engine.tier("disk").backend.idle_buffer_bytes
    engine.close()
    after_close = rss()
    return {"mode": mode, "before": before, "peak": peak[0], "after_close": after_close,
            "cpu_bytes": stats["cpu"]["bytes"], "disk_bytes": stats["disk"]["bytes"],
            "queue_bytes": engine.offloader.queue_bytes, "errors": errors[:3],
            "pool_idle": pool.free_bytes, "pool": str(pool), "disk_idle": disk_idle,
            "cpu_backend_bytes": held}


if __name__ == "__main__":
    root, seconds = sys.argv[1], float(sys.argv[2])
    start = rss()
    results = [soak(root, mode, seconds) for mode in sys.argv[3:]]
    print(json.dumps({"start": start, "results": results}))
