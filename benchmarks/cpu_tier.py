"""CPU tier speed: the ``cpu`` backend against plain torch copies, in the same run.

1. Store then retrieve of 32 MiB chunks (Llama-3-8B shape: 2 x 32 layers x 256
   tokens x 1024 hidden, fp16), the chunk sliced out of a longer KV as the engine
   does: put_now (one copy into a pooled buffer) + get_now + copy out + release,
   against two ``Tensor.copy_`` of the same bytes into preallocated buffers.
   Goal: >= 70% of the baseline's throughput.
2. Per-chunk overhead at 1 KiB: the same loop minus two 1 KiB copies. Goal: <= 20 us.
3. Through the engine (``CacheEngine.from_config``), when it is installed.

    python benchmarks/cpu_tier.py [--repeats 7] [--no-engine]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks_cpu import CpuBackend

MiB = 1 << 20


def keys(n: int) -> list[CacheKey]:
    return [CacheKey("bench", "kv", 1, 0, i.to_bytes(16, "little")) for i in range(n)]


def paired(baseline, ours, repeats: int, best: bool = False) -> tuple[float, float]:
    """Median (or, with ``best``, minimum) seconds of each; runs alternate so both see the same load."""
    baseline()
    ours()  # warm: the pool fills, pages are touched
    base, mine = [], []
    for _ in range(repeats):
        for fn, samples in ((baseline, base), (ours, mine)):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    pick = min if best else statistics.median
    return pick(base), pick(mine)


def big_chunks(repeats: int) -> list[tuple[str, float, float]]:
    layers, tokens, hidden, nchunks, resident = 32, 256, 1024, 8, 4
    kv = torch.randn(2, layers, tokens * nchunks, hidden, dtype=torch.float16)
    chunks = [kv[:, :, i * tokens:(i + 1) * tokens] for i in range(nchunks)]  # views, not contiguous
    nbytes = chunks[0].numel() * 2
    out = torch.empty(2, layers, tokens, hidden, dtype=torch.float16)
    staging = [torch.empty_like(out) for _ in range(resident)]
    ks = keys(nchunks)
    backend = CpuBackend()

    def baseline() -> None:
        for i, chunk in enumerate(chunks):
            stage = staging[i % resident]
            stage.copy_(chunk)
            out.copy_(stage)

    def tier() -> None:
        for i, chunk in enumerate(chunks):
            if i >= resident:
                backend.remove_now(ks[i - resident])  # eviction keeps `resident` chunks, as a full tier does
            backend.put_now(ks[i], MemoryObj(ks[i], chunk, tuple(chunk.shape), chunk.dtype))
            obj = backend.get_now(ks[i])
            out.copy_(obj.data)
            backend.release_now(obj)
        backend.clear_now()

    base, ours = paired(baseline, tier, repeats)
    assert torch.equal(out, chunks[-1])
    stats = backend.pool.stats()
    print(f"  pool after run: allocations={stats.allocations} reuses={stats.reuses} reserved={stats.reserved_bytes // MiB} MiB")
    def gbps(t):
        return nchunks * nbytes / t / 1e9
    return [("32 MiB chunk store+retrieve", gbps(base), gbps(ours))]


def small_chunks(repeats: int, best: bool = False) -> tuple[float, float]:
    n = 2000
    # 1 KiB: 2 x 2 layers x 4 tokens x 32 hidden fp16
    kv = torch.randn(2, 2, 4 * n, 32, dtype=torch.float16)
    chunks = [kv[:, :, i * 4:(i + 1) * 4] for i in range(n)]
    out = torch.empty(2, 2, 4, 32, dtype=torch.float16)
    stage = torch.empty_like(out)
    ks = keys(n)
    backend = CpuBackend()

    def baseline() -> None:
        for chunk in chunks:
            stage.copy_(chunk)
            out.copy_(stage)

    def tier() -> None:
        for k, chunk in zip(ks, chunks):
            backend.put_now(k, MemoryObj(k, chunk, (2, 2, 4, 32), torch.float16))
            obj = backend.get_now(k)
            out.copy_(obj.data)
            backend.release_now(obj)
        for k in ks:
            backend.remove_now(k)

    base, ours = paired(baseline, tier, repeats, best)
    return base / n * 1e6, ours / n * 1e6


def through_engine(repeats: int) -> None:
    try:
        from kvstacks import CacheEngine
    except Exception as exc:  # the engine is optional for this script
        print(f"engine not available ({exc}); skipped")
        return
    layers, tokens, hidden, nchunks = 32, 256, 1024, 8
    kv = torch.randn(2, layers, tokens * nchunks, hidden, dtype=torch.float16)
    out = torch.empty_like(kv)
    config = {"model": "bench", "chunk_size": tokens,
              "stack": [{"backend": "cpu", "capacity": f"{40 * nchunks}MiB"}]}
    with CacheEngine.from_config(config) as engine:
        seq = [0]

        def run() -> None:
            seq[0] += 1
            toks = [seq[0]] + list(range(tokens * nchunks - 1))  # fresh prefix each time: a real store
            engine.store(toks, kv)
            got, n = engine.retrieve(toks, out=out)
            assert n == tokens * nchunks

        stages = [torch.empty(2, layers, tokens, hidden, dtype=torch.float16) for _ in range(nchunks)]

        def baseline() -> None:
            # two copies per 32 MiB chunk, like the backend benchmark (one big copy is faster per byte)
            for i, st in enumerate(stages):
                st.copy_(kv[:, :, i * tokens:(i + 1) * tokens])
                out[:, :, i * tokens:(i + 1) * tokens].copy_(st)

        base, ours = paired(baseline, run, repeats)
        nbytes = kv.numel() * 2
        print(f"{'engine store+retrieve, 8 x 32 MiB':<34} {nbytes / base / 1e9:>10.2f} {nbytes / ours / 1e9:>10.2f} {base / ours:>7.0%}")

    # Tiny chunks: one prompt of 512 chunks of 4 tokens (1 KiB each), stored then
    # retrieved; the cost per chunk beyond its two copies is the engine's overhead.
    n_small, tiny = 512, 4
    small = torch.randn(2, 2, tiny * n_small, 32, dtype=torch.float16)
    small_out = torch.empty_like(small)
    small_stage = torch.empty_like(small)
    small_cfg = {"model": "small", "chunk_size": tiny, "stack": [{"backend": "cpu", "capacity": "1GiB"}]}
    with CacheEngine.from_config(small_cfg) as engine:
        counter = [0]

        def run_small() -> None:
            counter[0] += 1
            toks = [counter[0], *range(1, tiny * n_small)]
            engine.store(toks, small)
            _, n = engine.retrieve(toks, out=small_out)
            assert n == len(toks)

        def baseline_small() -> None:
            for i in range(n_small):
                small_stage[:, :, tiny * i:tiny * (i + 1)].copy_(small[:, :, tiny * i:tiny * (i + 1)])
                small_out[:, :, tiny * i:tiny * (i + 1)].copy_(small_stage[:, :, tiny * i:tiny * (i + 1)])

        b, o = paired(baseline_small, run_small, repeats)
        b, o = b / n_small * 1e6, o / n_small * 1e6
        print(f"engine, 512 x 1 KiB chunks in one store+retrieve: {o:.1f} us per chunk, two copies {b:.1f} us, "
              f"engine overhead {o - b:.1f} us per chunk (goal <= 20 us)")

        one = [0]

        def run_one() -> None:
            one[0] += 1
            toks = [one[0] + 1_000_000, 1, 2, 3]
            engine.store(toks, small[:, :, :tiny])
            engine.retrieve(toks, out=small_out)

        _, o1 = paired(lambda: None, run_one, repeats)
        print(f"engine, a 1-chunk prompt: store+retrieve {o1 * 1e6:.1f} us per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-engine", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, pinned={torch.cuda.is_available()}, medians of {args.repeats}")
    print(f"{'case':<34} {'baseline GB/s':>10} {'cpu tier GB/s':>10} {'ratio':>7}")
    for name, base, ours in big_chunks(args.repeats):
        print(f"{name:<34} {base:>10.2f} {ours:>10.2f} {ours / base:>7.0%}   (goal >= 70%)")
    for best in (False, True):
        base, ours = small_chunks(args.repeats, best)
        print(f"1 KiB chunk put+get+copy out+release ({'best run' if best else 'median'}): {ours:.2f} us per chunk, "
              f"two copies {base:.2f} us, backend overhead {ours - base:.2f} us (goal <= 20 us)")
    if not args.no_engine:
        through_engine(args.repeats)


if __name__ == "__main__":
    main()
