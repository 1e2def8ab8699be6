"""Redis tier throughput against redis-benchmark and a raw redis-py loop, same server, same run.

    python benchmarks/redis_tier.py [--sizes 1,8,32] [--repeats 5] [--total-mib 256]
                                    [--clients 4] [--url redis://127.0.0.1:6379/0]

Without --url it starts its own redis-server on a free loopback port (and stops it by
PID). Every figure is the median over ``--repeats`` runs, in GB/s of value bytes.
Baselines at each chunk size:

- redis-benchmark -d <size> -t set,get (C client, ``--clients`` connections);
- a raw redis-py asyncio loop: ``await r.set(k, v)`` / ``await r.get(k)`` one after another,
  and the same commands in one pipeline of a batch.

Both Python loops first write their keys once, untimed, so every timed write replaces a
value of the same size, as redis-benchmark's writes (to one key) do.

Ours: RedisBackend.put/get one chunk at a time, batch_put/batch_get of a batch (one
pipeline), and a batch of single calls in flight at once (what the engine's tier does when
it fetches a prefix: one call per chunk, gathered). The ratio is ours (best of the three)
over the better baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kvstacks.config import build_options
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[int, int]:
    port = free_port()
    pidfile = workdir / "redis.pid"
    subprocess.run(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "yes", "--pidfile", str(pidfile), "--dir", str(workdir),
         "--logfile", str(workdir / "redis.log"), "--proto-max-bulk-len", "1gb",
         "--client-query-buffer-limit", "1gb"],
        check=True,
    )
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port, int(pidfile.read_text())
            except OSError:
                pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def redis_benchmark(host: str, port: int, size: int, n: int, clients: int) -> dict[str, float]:
    out = subprocess.run(
        ["redis-benchmark", "-h", host, "-p", str(port), "-d", str(size), "-t", "set,get", "-n", str(n),
         "-c", str(clients), "--csv"],
        check=True, capture_output=True, text=True,
    ).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] in ("SET", "GET"):
            rates[cells[0].lower()] = float(cells[1]) * size / 1e9
    return rates


async def raw_redis_py(url: str, size: int, n: int, batch: int) -> dict[str, float]:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_read_size=1 << 20, socket_timeout=None)
    value = os.urandom(size)
    names = [b"rawbench:%d" % i for i in range(n)]
    rates = {}
    for name in names:  # warm-up: the server's memory for these values is allocated once, untimed
        await client.set(name, value)
    t = time.perf_counter()
    for name in names:
        await client.set(name, value)
    rates["set"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for name in names:
        await client.get(name)
    rates["get"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + batch]:
            pipe.set(name, value)
        await pipe.execute()
    rates["set_pipe"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + batch]:
            pipe.get(name)
        await pipe.execute()
    rates["get_pipe"] = n * size / (time.perf_counter() - t) / 1e9
    await client.delete(*names)
    await client.aclose()
    return rates


async def ours(url: str, size: int, n: int, batch: int) -> dict[str, float]:
    from kvstacks_redis import RedisBackend

    backend = RedisBackend(build_options(RedisBackend.Options, {"url": url, "prefix": "bench:"}, "bench"))
    await backend.start()
    # fp16 KV of one chunk: [2, layers, tokens, hidden] sized to ``size`` bytes
    hidden = size // (2 * 16 * 256 * 2)
    kv = torch.randn(2, 16, 256, hidden, dtype=torch.float16)
    keys = [CacheKey("bench", "kv", 1, 0, i.to_bytes(16, "little")) for i in range(n)]
    objs = [MemoryObj.from_kv(k, kv) for k in keys]
    rates = {}
    for key, obj in zip(keys, objs):  # warm-up, untimed, as for the raw loop
        await backend.put(key, obj)
    t = time.perf_counter()
    for key, obj in zip(keys, objs):
        await backend.put(key, obj)
    rates["set"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for key in keys:
        got = await backend.get(key)
        assert got is not None
    rates["get"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        await backend.batch_put(list(zip(keys[start : start + batch], objs[start : start + batch])))
    rates["set_pipe"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        got = await backend.batch_get(keys[start : start + batch])
        assert all(g is not None for g in got)
    rates["get_pipe"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        await asyncio.gather(*(backend.put(k, o) for k, o in zip(keys[start : start + batch], objs[start : start + batch])))
    rates["set_gather"] = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for start in range(0, n, batch):
        got = await asyncio.gather(*(backend.get(k) for k in keys[start : start + batch]))
        assert all(g is not None for g in got)
    rates["get_gather"] = n * size / (time.perf_counter() - t) / 1e9
    check = await backend.get(keys[0])
    assert torch.equal(check.data, kv), "read back differs"
    await backend.clear()
    await backend.close()
    return rates


def join_cost(size: int, repeats: int = 9) -> float:
    """Seconds to join one frame's parts into one bytes object (what cluster mode pays per put)."""
    from kvstacks import frame

    hidden = size // (2 * 16 * 256 * 2)
    obj = MemoryObj.from_kv(CacheKey("bench", "kv", 1, 0, bytes(16)), torch.randn(2, 16, 256, hidden).half())
    parts = frame.encode_parts(obj)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        b"".join(parts)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,8,32", help="chunk sizes in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement")
    ap.add_argument("--clients", type=int, default=50, help="redis-benchmark connections (capped at the requests)")
    ap.add_argument("--batch", type=int, default=8, help="chunks per batch_put/batch_get and raw pipeline")
    ap.add_argument("--url", help="use this server instead of starting one")
    args = ap.parse_args()
    if shutil.which("redis-benchmark") is None or (args.url is None and shutil.which("redis-server") is None):
        sys.exit("needs redis-server and redis-benchmark (apt-get install redis-server)")

    workdir = Path(tempfile.mkdtemp(prefix="kvstacks-redis-bench-"))
    pid = None
    if args.url:
        url = args.url
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    else:
        port, pid = start_server(workdir)
        host, url = "127.0.0.1", f"redis://127.0.0.1:{port}/0"
    print(f"server {host}:{port}; medians of {args.repeats} runs; GB/s of value bytes; batch {args.batch}")
    rows = []
    joins: list[tuple[int, float, float]] = []
    try:
        for mib in [int(s) for s in args.sizes.split(",")]:
            size = mib << 20
            n = max(args.batch, args.total_mib // mib)
            runs: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for label, rates in (
                    ("redis-benchmark", redis_benchmark(host, port, size, n, min(args.clients, n))),
                    ("redis-py", asyncio.run(raw_redis_py(url, size, n, args.batch))),
                    ("ours", asyncio.run(ours(url, size, n, args.batch))),
                ):
                    for op, rate in rates.items():
                        runs.setdefault(f"{label}/{op}", []).append(rate)
            med = {k: statistics.median(v) for k, v in runs.items()}
            joins.append((mib, join_cost(size), size / (med["ours/set"] * 1e9)))
            for op in ("set", "get"):
                bench = med[f"redis-benchmark/{op}"]
                raw = max(med[f"redis-py/{op}"], med[f"redis-py/{op}_pipe"])
                mine = (med[f"ours/{op}"], med[f"ours/{op}_pipe"], med[f"ours/{op}_gather"])
                best_base = max(bench, raw)
                rows.append((mib, "put" if op == "set" else "get", bench, med[f"redis-py/{op}"],
                             med[f"redis-py/{op}_pipe"], *mine, max(mine) / best_base))
    finally:
        if pid is not None:
            os.kill(pid, 15)
        shutil.rmtree(workdir, ignore_errors=True)
    head = ("chunk", "op", "redis-benchmark", "redis-py loop", "redis-py pipeline", "ours 1 by 1", "ours batch",
            "ours concurrent", "ours / best baseline")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mib, op, bench, raw, rawp, one, batch, gathered, ratio in rows:
        print(f"| {mib} MiB | {op} | {bench:.2f} | {raw:.2f} | {rawp:.2f} | {one:.2f} | {batch:.2f} | {gathered:.2f} "
              f"| {ratio:.0%} |")
    print()
    for mib, joined, put_time in joins:
        print(f"joining one {mib} MiB frame (cluster mode does, standalone does not): {joined * 1e3:.2f} ms, "
              f"{joined / put_time:.0%} of one put ({put_time * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
