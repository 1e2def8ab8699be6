"""Engine over the CPU tier: throughput vs. torch copies, per-chunk overhead, lookup at scale.

    python benchmarks/engine.py [--quick]

Baselines are measured in the same run: two torch copies of the same bytes (a store is one
copy in, a retrieve one copy out), and a bare loop doing the same per-chunk Python work.
Medians over repeats; the machine is shared, so read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from kvstacks import CacheEngine


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def big_chunks(repeats: int) -> None:
    kv = torch.randn(2, 32, 256, 1024).half()  # Llama-3-8B shape: 32 MiB per chunk
    a, b = torch.empty_like(kv), torch.empty_like(kv)
    out = torch.empty_like(kv)
    gb = kv.numel() * 2 / 1e9
    with CacheEngine.from_config({"model": "bench", "stack": [{"backend": "cpu", "capacity": "2GiB"}]}) as engine:
        rounds = []
        for r in range(repeats):
            tokens = [r] * 256
            started = time.perf_counter()
            engine.store(tokens, kv)
            engine.retrieve(tokens, out=out)
            into_buffer = time.perf_counter() - started
            engine.remove(tokens)
            started = time.perf_counter()
            engine.store(tokens, kv)
            engine.retrieve(tokens)
            fresh = time.perf_counter() - started
            engine.remove(tokens)
            started = time.perf_counter()
            a.copy_(kv)
            b.copy_(a)
            base = time.perf_counter() - started
            rounds.append((into_buffer, fresh, base))
    into_buffer, fresh, base = (statistics.median(r[i] for r in rounds) for i in range(3))
    print(f"32 MiB chunk, store then retrieve: baseline two torch copies {2 * gb / base:.2f} GB/s")
    print(f"  retrieve into the caller's buffer: {2 * gb / into_buffer:.2f} GB/s = {base / into_buffer:.0%} of baseline (goal >= 70%)")
    print(f"  retrieve into a new tensor:        {2 * gb / fresh:.2f} GB/s = {base / fresh:.0%} of baseline (pays first-touch page faults)")


def tiny_chunks(n_chunks: int, repeats: int) -> None:
    # 1 KiB chunks: [2, 1, 256, 1] fp16, n_chunks per call, into a tier at capacity (steady state:
    # every store evicts, buffers are recycled), as a busy cache runs.
    kv = torch.randn(2, 1, 256 * n_chunks, 1).half()
    dst = torch.empty(2, 1, 256, 1, dtype=torch.float16)

    def bare():
        for part in kv.split(256, dim=2):
            dst.copy_(part)

    for collector in ("on", "paused"):
        with CacheEngine.from_config({"model": "bench", "stack": [{"backend": "cpu", "capacity": "4MiB"}]}) as engine:
            round_no = [0]

            def store():
                round_no[0] += 1
                engine.store(torch.full((256 * n_chunks,), round_no[0], dtype=torch.int32), kv)

            for _ in range(100):
                store()  # fill to capacity first
            tokens = torch.full((256 * n_chunks,), round_no[0], dtype=torch.int32)
            if collector == "paused":
                gc.disable()
            try:
                store_s = median_time(store, repeats)
                retrieve_s = median_time(lambda: engine.retrieve(tokens), repeats)
                bare_s = median_time(bare, repeats)
            finally:
                gc.enable()
        print(f"1 KiB chunks, {n_chunks} per call, at capacity, garbage collector {collector}: "
              f"store {store_s / n_chunks * 1e6:.1f} us/chunk, retrieve {retrieve_s / n_chunks * 1e6:.1f} us/chunk; "
              f"bare split+copy loop {bare_s / n_chunks * 1e6:.1f} us/chunk -> overhead "
              f"{(store_s - bare_s) / n_chunks * 1e6:.1f} / {(retrieve_s - bare_s) / n_chunks * 1e6:.1f} us (goal <= 20 us)")


def lookup_at_scale(stored_chunks: int, repeats: int) -> None:
    chunk = 256
    kv = torch.zeros(2, 1, chunk, 1, dtype=torch.float16)
    prompt = torch.arange(32 * 1024, dtype=torch.int32) % 50000
    with CacheEngine.from_config({"model": "bench", "stack": [{"backend": "cpu", "capacity": "4GiB"}]}) as engine:
        engine.store(prompt, torch.zeros(2, 1, len(prompt), 1, dtype=torch.float16))
        filler = stored_chunks - len(prompt) // chunk
        for i in range(filler):
            engine.store(torch.full((chunk,), i, dtype=torch.int32), kv)
        objects = engine.stats()["cpu"]["objects"]
        hit_s = median_time(lambda: engine.lookup(prompt), repeats)
        miss_prompt = prompt.clone()
        miss_prompt[0] = 60000
        miss_s = median_time(lambda: engine.lookup(miss_prompt), repeats)
        found = engine.lookup(prompt)
    print(f"lookup of a {len(prompt)}-token prompt with {objects} chunks stored: "
          f"{hit_s * 1e3:.3f} ms when all {found} tokens hit, {miss_s * 1e3:.3f} ms on a miss (goal <= 1 ms)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and chunks")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    big_chunks(repeats)
    tiny_chunks(64, repeats * 4)
    lookup_at_scale(20_000 if args.quick else 100_000, repeats * 4)


if __name__ == "__main__":
    main()
