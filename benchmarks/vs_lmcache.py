"""kvstacks side by side with LMCache 0.5.6, and against raw baselines, in one run.

Where LMCache led in issue 16, each measured here in rounds whose order rotates
(ours, LMCache, the raw baseline), so every system sees the same load; figures are
medians over rounds, ratios are taken within a round.

1. cpu, first fill: a fresh tier stores ``--chunks`` chunks of 32 MiB
   (2 x 32 layers x 256 tokens x 1024, fp16, sliced out of one longer KV) right
   after start and, for kvstacks, again after its pre-faulting finished; LMCache's
   ``LocalCPUBackend`` (allocate + copy + put) from a fresh start; baseline: two
   torch copies of the same bytes into warm buffers. Also the p50 of one chunk's
   store on a fresh pool and on a warm one. ``ours-prefaulted+checks`` stores as a cpu
   tier does when a tier below writes frames: copied in blocks, each hashed as it is
   copied (the frame check the lower tiers then reuse).
2. redis: ``batch_put`` / ``batch_get`` (+ release) of the same chunks on one
   ``redis-server`` against LMCache's native RESP client (``resp://``:
   ``batch_set_sync`` / ``batch_get_sync`` into preallocated buffers) and raw
   redis-py pipelines of SET / GET. ``ours+check``: the chunks carry their frame check,
   as a cpu tier above hands them over (computed while copying them in, see 1). Every
   client stays open across rounds, as in a server (warm connections; LMCache reads
   into the same buffers each round, kvstacks into the read buffers the last round
   released), after one round not counted.
3. disk: cold reads (page cache dropped) of the same chunks: ``retrieve(out=)`` on a
   disk-only stack against LMCache's ``LocalDiskBackend.batched_get_blocking`` (into
   its pre-faulted cpu pool) and ``dd iflag=direct``.
4. cachegen: kvstacks' ``cachegen`` compressor (default level, its coder worker)
   against LMCache's ``CacheGenSerializer`` / ``CacheGenDeserializer`` (on CPU,
   its "test_model" bins) on the same ``--cachegen-chunks`` chunks, handed over
   as a ``.npy`` file; baselines: one torch copy, and core's lossless ``zstd``.
   MB/s of fp16 KV, size against fp16, mean absolute error. The chunks are
   random normal values, so the sizes say little (real KV: docs/cachegen.md).

LMCache runs in a subprocess of its own venv (``--lmcache-python``, default
/work/lmcache-venv/bin/python; LMCACHE_TRACK_USAGE=false); without it only
kvstacks and the baselines run.

    python benchmarks/vs_lmcache.py [--rounds 5] [--chunks 8] [--only cpu|redis|disk|cachegen] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from kvstacks import frame
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

MiB = 1 << 20
LAYERS, TOKENS, HIDDEN = 32, 256, 1024
CHUNK_SHAPE = (2, LAYERS, TOKENS, HIDDEN)
CHUNK_BYTES = 2 * LAYERS * TOKENS * HIDDEN * 2

# The LMCache side: one process answering JSON requests line by line on stdin.
LMCACHE_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, threading, time
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.resp_client import RESPClient

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    clients = {}
    buffers = {}

    def cpu_fill(layers, tokens, hidden, n, repeat):
        kv = torch.randn(2, layers, tokens * n, hidden, dtype=torch.float16)
        shape = torch.Size([2, layers, tokens, hidden])
        # Room for every pass: LMCache pre-faults its whole pool at start, so a second
        # pass into new blocks is as warm as a reuse.
        gib = (repeat + 0.5) * n * shape.numel() * 2 / 2**30
        config = LMCacheEngineConfig.from_defaults(chunk_size=tokens, local_cpu=True, max_local_cpu_size=gib)
        meta = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.float16, kv_shape=(layers, 2, tokens, 8, hidden // 8))
        t0 = time.perf_counter()
        backend = LocalCPUBackend(config, meta)
        start = time.perf_counter() - t0
        passes = []
        for p in range(repeat):
            times = []
            for i in range(n):
                t = time.perf_counter()
                obj = backend.allocate(shape, torch.float16)
                obj.tensor.copy_(kv[:, :, i * tokens:(i + 1) * tokens].reshape(obj.tensor.shape))
                backend.submit_put_task(CacheEngineKey("bench", 1, 0, p * n + i, torch.float16), obj)
                obj.ref_count_down()  # the backend holds its own reference now, as LMCache's store does
                times.append(time.perf_counter() - t)
            passes.append(times)
        backend.close()
        return {"start": start, "passes": passes}

    def resp(host, port, n, nbytes, threads):
        key = (host, port)
        if key not in clients:
            clients[key] = RESPClient(host, port, threads, loop)
        client = clients[key]
        if (n, nbytes) not in buffers:  # kept across calls: warm, as LMCache's own pool is
            buffers[n, nbytes] = ([torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(n)],
                                  [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n)])
        src, dst = buffers[n, nbytes]
        for d in dst:
            d[::4096] = 0  # a stale read could not pass for a fresh one (the check below)
        names = [f"lmcache-bench-{i}" for i in range(n)]
        t = time.perf_counter()
        client.batch_set_sync(names, [memoryview(s.numpy()) for s in src])
        put = time.perf_counter() - t
        t = time.perf_counter()
        client.batch_get_sync(names, [memoryview(d.numpy()) for d in dst])
        get = time.perf_counter() - t
        assert all(torch.equal(a, b) for a, b in zip(src, dst)), "LMCache read back other bytes"
        return {"put": put, "get": get}

    disk_state = {}

    def disk_put(path, layers, tokens, hidden, n):
        from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
        shape = torch.Size([2, layers, tokens, hidden])
        gib = (n + 1) * shape.numel() * 2 / 2**30
        config = LMCacheEngineConfig.from_defaults(chunk_size=tokens, local_cpu=True, max_local_cpu_size=gib,
                                                   local_disk=path, max_local_disk_size=2 * gib)
        meta = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.float16, kv_shape=(layers, 2, tokens, 8, hidden // 8))
        cpu = LocalCPUBackend(config, meta)
        disk = LocalDiskBackend(config, loop, cpu, "cpu", metadata=meta)
        kv = torch.randn(2, layers, tokens * n, hidden, dtype=torch.float16)
        keys = [CacheEngineKey("bench", 1, 0, i, torch.float16) for i in range(n)]
        t = time.perf_counter()
        for i, key in enumerate(keys):
            obj = cpu.allocate(shape, torch.float16)
            obj.tensor.copy_(kv[:, :, i * tokens:(i + 1) * tokens].reshape(obj.tensor.shape))
            disk.submit_put_task(key, obj)
            obj.ref_count_down()
        while not all(disk.contains(key) for key in keys):
            time.sleep(0.001)
        put = time.perf_counter() - t
        disk_state.update(cpu=cpu, disk=disk, keys=keys, kv=kv, tokens=tokens)
        return {"put": put}

    def disk_get():
        disk, keys, kv, tokens = disk_state["disk"], disk_state["keys"], disk_state["kv"], disk_state["tokens"]
        t = time.perf_counter()
        objs = disk.batched_get_blocking(keys)
        get = time.perf_counter() - t
        for i, obj in enumerate(objs):
            want = kv[:, :, i * tokens:(i + 1) * tokens].reshape(obj.tensor.shape)
            assert torch.equal(obj.tensor, want), "LMCache read back other bytes"
            obj.ref_count_down()
        return {"get": get}

    def disk_close():
        disk_state["disk"].close()
        disk_state["cpu"].close()
        disk_state.clear()
        return {}

    def cachegen(path, repeat):
        import numpy as np
        from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
        from lmcache.v1.storage_backend.naive_serde.cachegen_decoder import CacheGenDeserializer
        from lmcache.v1.storage_backend.naive_serde.cachegen_encoder import CacheGenSerializer

        chunks = torch.from_numpy(np.load(path, allow_pickle=False)).view(torch.float16)
        _, layers, tokens, hidden = chunks.shape[1:]
        config = LMCacheEngineConfig.from_defaults(chunk_size=tokens, local_cpu=True, max_local_cpu_size=1)
        meta = LMCacheMetadata(model_name="test_model", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.float16, kv_shape=(layers, 2, tokens, 8, hidden // 8))
        encoder, decoder = CacheGenSerializer(config, meta), CacheGenDeserializer(config, meta)
        objs = [TensorMemoryObj(c.contiguous().view(torch.uint8).reshape(-1),
                                MemoryObjMetadata(c.shape, torch.float16, 0, c.numel() * 2, 1, 0, MemoryFormat.KV_2LTD),
                                None) for c in chunks]
        result = {"encode": [], "decode": []}
        for _ in range(repeat):
            t = time.perf_counter()
            coded = [encoder.serialize(o) for o in objs]
            result["encode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = [decoder.deserialize(c) for c in coded]
            result["decode"].append(time.perf_counter() - t)
        result["bytes"] = sum(c.get_size() for c in coded)
        result["error"] = sum(float((o.tensor.float() - c.float()).abs().mean()) for o, c in zip(out, chunks)) / len(out)
        return result

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        print(json.dumps(globals()[op](**request)), flush=True)
    """
)


class LMCache:
    """The LMCache worker subprocess, or None-like when its venv is missing."""

    def __init__(self, python: str) -> None:
        env = dict(os.environ, LMCACHE_TRACK_USAGE="false", LMCACHE_LOG_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, "-c", LMCACHE_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, cwd=tempfile.gettempdir())
        self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the LMCache worker exited ({self.proc.wait()})")

    def __call__(self, op: str, **args) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def rotated(items: list, round_: int) -> list:
    k = round_ % len(items)
    return items[k:] + items[:k]


def keys(n: int, offset: int = 0) -> list[CacheKey]:
    return [CacheKey("bench", "kv", 1, 0, (offset + i).to_bytes(16, "little")) for i in range(n)]


def chunks_of(n: int) -> list[torch.Tensor]:
    kv = torch.randn(2, LAYERS, TOKENS * n, HIDDEN, dtype=torch.float16)
    return [kv[:, :, i * TOKENS:(i + 1) * TOKENS] for i in range(n)]


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


# -- cpu ------------------------------------------------------------------------------------------

def ours_cpu_fill(chunks: list[torch.Tensor], wait: bool, checks: bool = False) -> dict:
    """A fresh cpu backend started as a tier starts it, then one pass of stores (and a warm one).

    ``checks``: as the engine sets it up when a tier below writes frames (``carry_checks``):
    each chunk is copied in blocks and hashed as it is copied."""
    from kvstacks_cpu import CpuBackend

    backend = CpuBackend()
    backend.carry_checks = checks
    backend.capacity = int(1.05 * len(chunks) * CHUNK_BYTES)
    t0 = time.perf_counter()
    asyncio.run(backend.start())
    start = time.perf_counter() - t0
    if wait and backend.pool._arena is not None:
        backend.pool._arena.done.wait()
    passes = []
    for p in range(2):
        times = []
        for key, chunk in zip(keys(len(chunks), p * len(chunks)), chunks):
            t = time.perf_counter()
            backend.put_now(key, MemoryObj(key, chunk, CHUNK_SHAPE, torch.float16))
            times.append(time.perf_counter() - t)
        passes.append(times)
        backend.clear_now()
    asyncio.run(backend.close())
    return {"start": start, "passes": passes}


def two_copies(chunks: list[torch.Tensor]) -> float:
    staging = torch.empty(CHUNK_SHAPE, dtype=torch.float16)
    out = torch.empty_like(staging)
    staging.copy_(chunks[0])
    out.copy_(staging)
    t = time.perf_counter()
    for chunk in chunks:
        staging.copy_(chunk)
        out.copy_(staging)
    return (time.perf_counter() - t) / 2  # one copy's time, comparable with a store's one copy


def bench_cpu(rounds: int, n: int, lmcache: LMCache | None) -> None:
    chunks = chunks_of(n)
    nbytes = n * CHUNK_BYTES
    rows: dict[str, list[float]] = {}
    p50: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    def add(table: dict, name: str, value: float) -> None:
        table.setdefault(name, []).append(value)

    for r in range(rounds):
        results: dict[str, float] = {}
        systems = ["ours-now", "ours-prefaulted", "ours-prefaulted+checks", "baseline"] + (["lmcache"] if lmcache else [])
        for system in rotated(systems, r):
            if system == "baseline":
                results["baseline"] = gbps(nbytes, two_copies(chunks))
                continue
            if system == "lmcache":
                got = lmcache("cpu_fill", layers=LAYERS, tokens=TOKENS, hidden=HIDDEN, n=n, repeat=2)
            else:
                got = ours_cpu_fill(chunks, wait=system != "ours-now", checks=system.endswith("+checks"))
            fresh, warm = got["passes"]
            results[system] = gbps(nbytes, sum(fresh))
            add(rows, f"{system} start s", got["start"])
            add(p50, f"{system} fresh", statistics.median(fresh) * 1e3)
            add(p50, f"{system} warm", statistics.median(warm) * 1e3)
        for name, value in results.items():
            add(rows, f"{name} GB/s", value)
            if name != "baseline":
                add(ratios, f"{name} / one torch copy", value / results["baseline"])
                if "lmcache" in results and name != "lmcache":
                    add(ratios, f"{name} / lmcache", value / results["lmcache"])
    print(f"\ncpu first fill: {n} chunks of {CHUNK_BYTES // MiB} MiB into a fresh tier, medians of {rounds} rounds")
    for name, values in rows.items():
        print(f"  {name:32s} {statistics.median(values):8.3f}")
    for name, values in p50.items():
        print(f"  one chunk's store p50, {name:18s} {statistics.median(values):8.2f} ms")
    for name, values in ratios.items():
        print(f"  {name:32s} {statistics.median(values):8.2f}x   (rounds: {' '.join(f'{v:.2f}' for v in values)})")


# -- redis ----------------------------------------------------------------------------------------

class OursRedis:
    """A redis tier kept open across rounds, as an engine keeps it (warm connections and read buffers)."""

    def __init__(self, url: str, chunks: list[torch.Tensor]) -> None:
        from kvstacks_redis.backend import RedisBackend
        from kvstacks_redis.connect import RedisOptions

        self.backend = RedisBackend(RedisOptions(url=url, prefix="bench:", timeout=300))
        self.chunks = chunks
        self.items = [(k, MemoryObj(k, c, CHUNK_SHAPE, torch.float16)) for k, c in zip(keys(len(chunks)), chunks)]
        # The same chunks as a cpu tier above hands them over: carrying the frame check it
        # computed while copying them in (that cost is the cpu store's, measured above).
        self.carried = []
        for k, c in zip(keys(len(chunks)), chunks):
            obj = MemoryObj(k, c, CHUNK_SHAPE, torch.float16)
            obj.check = int.from_bytes(frame.checksum(frame.header(obj), *obj.payload_runs()), "little")
            self.carried.append((k, obj))

    async def start(self) -> None:
        await self.backend.start()

    async def round(self, carried: bool = False) -> tuple[float, float]:
        backend = self.backend
        t = time.perf_counter()
        await backend.batch_put(self.carried if carried else self.items)
        put = time.perf_counter() - t
        t = time.perf_counter()
        got = await backend.batch_get([k for k, _ in self.items])
        get = time.perf_counter() - t
        assert all(g is not None and torch.equal(g.data, c) for g, c in zip(got, self.chunks)), "kvstacks read back other bytes"
        for obj in got:
            backend.release_now(obj)
        return put, get

    async def close(self) -> None:
        await self.backend.clear()
        await self.backend.close()


class RawRedisPy:
    """Pipelines of SET / GET on one redis-py asyncio client, kept open across rounds."""

    def __init__(self, url: str, blobs: list[bytes]) -> None:
        from redis.asyncio import Redis

        self.client = Redis.from_url(url, socket_timeout=300)
        self.blobs = blobs
        self.names = [f"raw-bench-{i}" for i in range(len(blobs))]

    async def round(self) -> tuple[float, float]:
        pipe = self.client.pipeline(transaction=False)
        for name, blob in zip(self.names, self.blobs):
            pipe.set(name, blob)
        t = time.perf_counter()
        await pipe.execute()
        put = time.perf_counter() - t
        pipe = self.client.pipeline(transaction=False)
        for name in self.names:
            pipe.get(name)
        t = time.perf_counter()
        values = await pipe.execute()
        get = time.perf_counter() - t
        assert values == self.blobs, "redis-py read back other bytes"
        return put, get

    async def close(self) -> None:
        await self.client.delete(*self.names)
        await self.client.aclose()


def bench_redis(rounds: int, n: int, lmcache: LMCache | None) -> None:
    from kvstacks.testing.redis_servers import RedisServer

    chunks = chunks_of(n)
    blobs = [c.contiguous().view(torch.uint8).numpy().tobytes() for c in chunks]
    nbytes = n * CHUNK_BYTES
    rows: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), "--save", "", "--appendonly", "no").start()
        loop = asyncio.new_event_loop()
        ours, raw = OursRedis(server.url, chunks), RawRedisPy(server.url, blobs)
        try:
            host, port = server.url.split("//")[1].split("/")[0].rsplit(":", 1)
            loop.run_until_complete(ours.start())

            def run(system: str) -> tuple[float, float]:
                if system.startswith("ours"):
                    return loop.run_until_complete(ours.round(carried=system == "ours+check"))
                if system == "redis-py":
                    return loop.run_until_complete(raw.round())
                got = lmcache("resp", host=host, port=int(port), n=n, nbytes=CHUNK_BYTES, threads=8)
                return got["put"], got["get"]

            systems = ["ours", "ours+check", "redis-py"] + (["lmcache resp"] if lmcache else [])
            for system in systems:  # a round not counted: connections open, buffers faulted in
                run(system)
            for r in range(rounds):
                results: dict[str, tuple[float, float]] = {}
                for system in rotated(systems, r):
                    results[system] = run(system)
                for system, (put, get) in results.items():
                    rows.setdefault(f"{system} put GB/s", []).append(gbps(nbytes, put))
                    rows.setdefault(f"{system} get GB/s", []).append(gbps(nbytes, get))
                for mine in ("ours", "ours+check"):
                    for other in [s for s in results if not s.startswith("ours")]:
                        for i, what in enumerate(("put", "get")):
                            ratios.setdefault(f"{mine} / {other} {what}", []).append(results[other][i] / results[mine][i])
        finally:
            loop.run_until_complete(ours.close())
            loop.run_until_complete(raw.close())
            loop.close()
            server.stop()
    print(f"\nredis: batches of {n} chunks of {CHUNK_BYTES // MiB} MiB, one redis-server, medians of {rounds} rounds")
    for name, values in rows.items():
        print(f"  {name:28s} {statistics.median(values):8.3f}")
    for name, values in ratios.items():
        print(f"  {name:28s} {statistics.median(values):8.2f}x   (rounds: {' '.join(f'{v:.2f}' for v in values)})")


# -- disk -----------------------------------------------------------------------------------------

def drop_page_cache() -> None:
    """Make the next read come from the device (needs root; else the reads are warm and say so)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        print("  (cannot drop the page cache: reads below are warm)", file=sys.stderr)


def dd_read(path: str) -> float:
    """Seconds for ``dd iflag=direct`` to read ``path`` in blocks of one chunk (one process, as it reports)."""
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={CHUNK_BYTES}", "iflag=direct"],
                          capture_output=True, text=True, check=True)
    return float(done.stderr.rsplit(" copied, ", 1)[1].split(" s")[0])


def bench_disk(rounds: int, n: int, lmcache: LMCache | None, directory: str | None) -> None:
    """Cold reads of ``n`` chunks: kvstacks' ``retrieve(out=)`` on a disk-only stack, LMCache's
    ``LocalDiskBackend.batched_get_blocking`` (into its pre-faulted cpu pool), ``dd iflag=direct``."""
    from kvstacks import CacheEngine

    kv = torch.cat(chunks_of(n), dim=2).contiguous()
    tokens = [7] + list(range(TOKENS * n - 1))
    out = torch.empty_like(kv)
    nbytes = n * CHUNK_BYTES
    rows: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvstacks-vs-lmcache-", dir=directory) as tmp:
        ours_path, theirs_path, dd_path = (os.path.join(tmp, d) for d in ("kvstacks", "lmcache", "dd"))
        os.makedirs(theirs_path)
        os.makedirs(dd_path)
        config = {"model": "bench", "chunk_size": TOKENS, "stack": [{"backend": "disk", "path": ours_path}]}
        with CacheEngine.from_config(config) as engine:
            t = time.perf_counter()
            engine.store(tokens, kv)
            rows["kvstacks store GB/s"] = [gbps(nbytes, time.perf_counter() - t)]
        dd_file = os.path.join(dd_path, "chunks.bin")
        with open(dd_file, "wb") as f:
            for chunk in chunks_of(n):
                f.write(chunk.contiguous().view(torch.uint8).numpy().tobytes())
        if lmcache:
            got = lmcache("disk_put", path=theirs_path, layers=LAYERS, tokens=TOKENS, hidden=HIDDEN, n=n)
            rows["lmcache store GB/s"] = [gbps(nbytes, got["put"])]
        with CacheEngine.from_config(config) as engine:
            engine.retrieve(tokens, out=out)  # warm-up, as LMCache's pool is pre-faulted
            for r in range(rounds):
                results: dict[str, float] = {}
                for system in rotated(["kvstacks", "dd"] + (["lmcache"] if lmcache else []), r):
                    drop_page_cache()
                    if system == "kvstacks":
                        t = time.perf_counter()
                        _, held = engine.retrieve(tokens, out=out)
                        results[system] = time.perf_counter() - t
                        assert held == len(tokens) and torch.equal(out, kv), "kvstacks read back other bytes"
                        out.zero_()
                    elif system == "dd":
                        results[system] = dd_read(dd_file)
                    else:
                        results[system] = lmcache("disk_get")["get"]
                for system, seconds in results.items():
                    rows.setdefault(f"{system} cold read GB/s", []).append(gbps(nbytes, seconds))
                for other in [s for s in results if s != "kvstacks"]:
                    ratios.setdefault(f"kvstacks / {other} read", []).append(results[other] / results["kvstacks"])
        if lmcache:
            lmcache("disk_close")
    print(f"\ndisk: {n} chunks of {CHUNK_BYTES // MiB} MiB, cold reads (page cache dropped), medians of {rounds} rounds")
    print("  kvstacks: engine.retrieve(out=) on a disk-only stack (checksums verified); LMCache:")
    print("  LocalDiskBackend.batched_get_blocking into its pool (no checksum); dd iflag=direct, bs = a chunk")
    for name, values in rows.items():
        print(f"  {name:28s} {statistics.median(values):8.3f}")
    for name, values in ratios.items():
        print(f"  {name:28s} {statistics.median(values):8.2f}x   (rounds: {' '.join(f'{v:.2f}' for v in values)})")


# -- cachegen -------------------------------------------------------------------------------------

def bench_cachegen(rounds: int, n: int, lmcache: LMCache | None) -> None:
    import numpy as np
    from kvstacks.builtin.compressors import ZstdCompressor
    from kvstacks_cachegen.compressor import CacheGenCompressor

    chunks = [c.contiguous() for c in chunks_of(n)]
    nbytes = n * CHUNK_BYTES
    ours, zstd = CacheGenCompressor(), ZstdCompressor()
    rows: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    sizes: dict[str, tuple[float, float]] = {}

    def codec(coder) -> tuple[float, float, int, float]:
        t = time.perf_counter()
        payloads = [coder.compress(c) for c in chunks]
        encode = time.perf_counter() - t
        t = time.perf_counter()
        out = [coder.decompress(memoryview(p), CHUNK_SHAPE, torch.float16) for p in payloads]
        decode = time.perf_counter() - t
        error = sum(float((o.float() - c.float()).abs().mean()) for o, c in zip(out, chunks)) / n
        return encode, decode, sum(len(p) for p in payloads), error

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chunks.npy"
        np.save(path, torch.stack(chunks).view(torch.int16).numpy(), allow_pickle=False)
        codec(ours)  # starts and warms the coder worker
        for r in range(rounds):
            results: dict[str, tuple[float, float]] = {}
            for system in rotated(["ours", "zstd", "copy"] + (["lmcache"] if lmcache else []), r):
                if system == "copy":
                    copy = two_copies(chunks)
                    results[system] = (copy, copy)
                    continue
                if system == "lmcache":
                    got = lmcache("cachegen", path=str(path), repeat=1)
                    encode, decode, size, error = got["encode"][0], got["decode"][0], got["bytes"], got["error"]
                else:
                    encode, decode, size, error = codec(ours if system == "ours" else zstd)
                results[system] = (encode, decode)
                sizes[system] = (nbytes / size, error)
            for system, (encode, decode) in results.items():
                rows.setdefault(f"{system} encode MB/s", []).append(nbytes / encode / 1e6)
                rows.setdefault(f"{system} decode MB/s", []).append(nbytes / decode / 1e6)
            for other in [s for s in results if s != "ours"]:
                for i, what in enumerate(("encode", "decode")):
                    ratios.setdefault(f"ours / {other} {what}", []).append(results[other][i] / results["ours"][i])
    print(f"\ncachegen: {n} chunks of {CHUNK_BYTES // MiB} MiB (random normal fp16), medians of {rounds} rounds")
    for name, values in rows.items():
        print(f"  {name:28s} {statistics.median(values):10.1f}")
    for name, (ratio, error) in sizes.items():
        print(f"  {name:8s} size {ratio:6.3f}x smaller than fp16, mean abs error {error:.4f}")
    for name, values in ratios.items():
        print(f"  {name:28s} {statistics.median(values):8.2f}x   (rounds: {' '.join(f'{v:.2f}' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--only", choices=["cpu", "redis", "disk", "cachegen"])
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--cachegen-chunks", type=int, default=2, help="LMCache's CacheGen runs at ~10 MB/s on CPU")
    parser.add_argument("--lmcache-python", default="/work/lmcache-venv/bin/python")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    lmcache = None
    if Path(args.lmcache_python).exists():
        lmcache = LMCache(args.lmcache_python)
    else:
        print(f"LMCache not found at {args.lmcache_python}: kvstacks and the raw baselines only", file=sys.stderr)
    try:
        if args.only in (None, "cpu"):
            bench_cpu(args.rounds, args.chunks, lmcache)
        if args.only in (None, "redis"):
            bench_redis(args.rounds, args.chunks, lmcache)
        if args.only in (None, "disk"):
            bench_disk(args.rounds, args.chunks, lmcache, args.dir)
        if args.only in (None, "cachegen"):
            bench_cachegen(args.rounds, args.cachegen_chunks, lmcache)
    finally:
        if lmcache:
            lmcache.close()
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
