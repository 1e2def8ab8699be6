"""Disk tier speed: the ``disk`` backend against ``dd`` with O_DIRECT, in the same run.

1. Write and read throughput at the chunk size (32 MiB: Llama-3-8B, 256 tokens, fp16)
   against ``dd oflag=direct`` / ``dd iflag=direct`` with bs = the chunk size, on
   the same directory. Reads are cold: sync, then ``/proc/sys/vm/drop_caches``
   (as root), else posix_fadvise(DONTNEED) on every chunk file.
   Writes are timed to when put() returns (data in the page cache, as with any
   buffered writer) and to after a following sync() (on the device).
2. How to do the I/O: one thread hop with os calls (what the backend does)
   against aiofiles (a thread hop per open/write/close/rename), at 4 KiB and 32 MiB.
3. Restart: a new backend on a directory holding 10,000 chunks lists them all.
   Goal: <= 3 s. Also through the engine (``CacheEngine.from_config``) when installed.

    python benchmarks/disk_tier.py [--dir /path/on/the/disk] [--chunks 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import aiofiles
import aiofiles.os
import torch
from kvstacks.frame import encode_parts
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks_disk import DiskBackend, chunk_path

MiB = 1 << 20


def keys(n: int, tag: int = 0) -> list[CacheKey]:
    return [CacheKey("bench", "kv", 1, 0, tag.to_bytes(4, "little") + i.to_bytes(12, "little")) for i in range(n)]


def chunk(tokens: int = 256, layers: int = 32, hidden: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, tokens, hidden, generator=g).to(torch.float16)


def _can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


DROP_CACHES = _can_drop_caches()


def drop_cache(paths: list[str]) -> None:
    """Make the next read of ``paths`` come from the device."""
    os.sync()  # dirty pages cannot be dropped
    if DROP_CACHES:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")  # page cache, dentries and inodes: a cold open too
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd(args: list[str]) -> float:
    """Bytes per second as dd reports it."""
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    assert match, done.stderr
    return int(match.group(1)) / float(match.group(2))


def dd_baseline(directory: str, chunk_bytes: int, count: int) -> tuple[float, float]:
    target = os.path.join(directory, "dd.bin")
    try:
        write = dd(["if=/dev/zero", f"of={target}", f"bs={chunk_bytes}", f"count={count}", "oflag=direct"])
        read = dd([f"if={target}", "of=/dev/null", f"bs={chunk_bytes}", "iflag=direct"])
    finally:
        os.unlink(target)
    return write, read


async def throughput(directory: str, nchunks: int, repeats: int) -> None:
    kv = chunk()
    nbytes = kv.numel() * kv.element_size()
    rows: dict[str, list[float]] = {"dd oflag=direct write": [], "dd iflag=direct read": []}
    for rep in range(repeats):
        write, read = dd_baseline(directory, nbytes, nchunks)
        rows["dd oflag=direct write"].append(write)
        rows["dd iflag=direct read"].append(read)
        for o_direct in (True, False):
            mode = "o_direct" if o_direct else "buffered"

            def record(name: str, seconds: float) -> None:
                rows.setdefault(f"{mode}: {name}", []).append(nchunks * nbytes / seconds)

            root = os.path.join(directory, f"tier{rep}{mode}")
            disk = DiskBackend(DiskBackend.Options(path=root, o_direct=o_direct))
            await disk.start()
            ks = keys(nchunks, rep)
            objs = [MemoryObj(k, kv, tuple(kv.shape), kv.dtype) for k in ks]
            paths = [chunk_path(disk.root, k) for k in ks]
            t0 = time.perf_counter()
            for k, o in zip(ks, objs):
                await disk.put(k, o)
            t1 = time.perf_counter()
            os.sync()
            record("put", t1 - t0)
            record("put + sync", time.perf_counter() - t0)

            drop_cache(paths)
            t0 = time.perf_counter()
            for k in ks:
                got = await disk.get(k)
                await disk.release(got)  # what the engine does after copying out
            record("get + release, cold", time.perf_counter() - t0)
            drop_cache(paths)
            t0 = time.perf_counter()
            for k in ks:
                got = await disk.get(k)
                assert got is not None
            del got
            record("get (no release), cold", time.perf_counter() - t0)
            drop_cache(paths)
            t0 = time.perf_counter()
            got_all = await disk.batch_get(ks)
            for g in got_all:
                await disk.release(g)
            record("batch_get + release, cold", time.perf_counter() - t0)
            del got_all
            await disk.clear()
            os.sync()
            t0 = time.perf_counter()
            await disk.batch_put(list(zip(ks, objs)))
            record("batch_put", time.perf_counter() - t0)
            await disk.clear()
            await disk.close()
            shutil.rmtree(root)
            os.sync()

    med = {k: statistics.median(v) / 1e6 for k, v in rows.items()}
    print(f"\n{nchunks} chunks of {nbytes / MiB:.0f} MiB, medians of {repeats} (MB/s; ratio against dd O_DIRECT)")
    for name, value in med.items():
        base = med["dd oflag=direct write"] if ("put" in name or "write" in name) else med["dd iflag=direct read"]
        print(f"  {name:<36} {value:>9.0f}   {value / base:>6.0%}")


async def io_styles(directory: str, repeats: int) -> None:
    """One thread hop with os calls (the backend) against aiofiles, same frames, both buffered."""
    print("\nwrite path, both buffered: one thread hop of os calls (backend) vs aiofiles, median per put")
    for label, kv in (("4 KiB", chunk(tokens=1, layers=1, hidden=1024)), ("32 MiB", chunk())):
        n = 200 if kv.numel() < MiB else 6
        root = os.path.join(directory, "styles")
        disk = DiskBackend(DiskBackend.Options(path=root, o_direct=False))  # aiofiles cannot do O_DIRECT
        await disk.start()

        async def backend_puts(ks: list[CacheKey]) -> None:
            for k in ks:
                await disk.put(k, MemoryObj(k, kv, tuple(kv.shape), kv.dtype))

        async def aiofiles_puts(ks: list[CacheKey]) -> None:
            for k in ks:
                obj = MemoryObj(k, kv, tuple(kv.shape), kv.dtype)
                parts = await asyncio.to_thread(encode_parts, obj)  # the checksum must not block the loop
                path = chunk_path(root, k)
                await aiofiles.os.makedirs(os.path.dirname(path), exist_ok=True)
                temp = f"{path}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
                async with aiofiles.open(temp, "xb", buffering=0) as f:
                    for part in parts:
                        await f.write(part)
                await aiofiles.os.replace(temp, path)

        styles = [("os calls, one hop", backend_puts), ("aiofiles", aiofiles_puts)]
        samples: dict[str, list[float]] = {name: [] for name, _ in styles}
        for rep in range(max(repeats, 4)):
            # Alternate who goes first: the second writer reuses page-cache pages the
            # first one's files freed, which on a VM is much cheaper than fresh memory.
            for name, fn in styles if rep % 2 == 0 else styles[::-1]:
                ks = keys(n, 1000 + rep)
                os.sync()
                t0 = time.perf_counter()
                await fn(ks)
                samples[name].append((time.perf_counter() - t0) / n)
                await disk.clear()
        results = {name: statistics.median(v) for name, v in samples.items()}
        base = results["aiofiles"]
        for name, t in results.items():
            print(f"  {label:>6} {name:<20} {t * 1e6:>10.0f} us   {base / t:>5.2f}x aiofiles speed")
        shutil.rmtree(root)


async def restart(directory: str, count: int, with_engine: bool) -> None:
    root = os.path.join(directory, "restart")
    disk = DiskBackend(DiskBackend.Options(path=root))
    await disk.start()
    kv = chunk(tokens=1, layers=1, hidden=512)
    ks = keys(count, 77)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: disk._write(chunk_path(root, k), MemoryObj(k, kv, tuple(kv.shape), kv.dtype)), ks))
    os.sync()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fresh = DiskBackend(DiskBackend.Options(path=root))
        await fresh.start()
        listed = [item async for item in fresh.keys()]
        samples.append(time.perf_counter() - t0)
        assert len(listed) == count
    print(f"\nrestart with {count} chunks on disk: backend start + keys() {statistics.median(samples):.3f} s (goal <= 3 s)")
    try:
        from kvstacks import CacheEngine
    except Exception as exc:
        print(f"  engine not available ({exc}); skipped")
    else:
        if with_engine:
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                engine = CacheEngine.from_config({"model": "bench", "stack": [{"backend": "disk", "path": root}]})
                n = sum(len(v) for v in engine.keys().values())
                samples.append(time.perf_counter() - t0)
                engine.close()
                assert n == count, n
            print(f"  through the engine (from_config until ready, index rebuilt): {statistics.median(samples):.3f} s")
    shutil.rmtree(root)


def through_engine(directory: str, nchunks: int, repeats: int) -> None:
    """Store, then cold retrieve into the caller's ``out``: straight into it (the engine's path
    for an uncompressed disk tier) and through the backend's read buffers plus a copy (the path
    before, still taken for compressed chunks), each after a warm-up so neither faults memory in."""
    try:
        from kvstacks import CacheEngine
    except Exception as exc:
        print(f"\nengine not available ({exc}); skipped")
        return
    tokens = 256
    kv = torch.cat([chunk(seed=i) for i in range(nchunks)], dim=2)
    nbytes = kv.numel() * 2
    out = torch.empty_like(kv)  # like dd, no fresh memory per read
    root = os.path.join(directory, "engine")
    config = {"model": "bench", "chunk_size": tokens, "stack": [{"backend": "disk", "path": root}]}
    rows: dict[str, list[float]] = {"store": [], "dd oflag=direct": [], "dd iflag=direct": []}
    ratios: dict[str, list[float]] = {}
    for rep in range(repeats):
        w, r = dd_baseline(directory, nbytes // nchunks, nchunks)
        rows["dd oflag=direct"].append(w)
        rows["dd iflag=direct"].append(r)
        toks = [rep + 1] + list(range(tokens * nchunks - 1))
        with CacheEngine.from_config(config) as engine:
            t0 = time.perf_counter()
            engine.store(toks, kv)
            rows["store"].append(nbytes / (time.perf_counter() - t0))
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        with CacheEngine.from_config(config) as engine:
            backend = engine.tier("disk").backend
            straight = backend.batch_get_into
            for path in ("into out", "via read buffers"):
                if path == "via read buffers":
                    backend.batch_get_into = lambda keys, places: backend.batch_get(keys)
                engine.retrieve(toks, out=out)  # warm-up: read buffers exist, out is touched
                backend.batch_get_into = straight
            results = {}
            for path in ("into out", "via read buffers")[rep % 2:] + ("into out", "via read buffers")[:rep % 2]:
                if path == "via read buffers":
                    backend.batch_get_into = lambda keys, places: backend.batch_get(keys)
                drop_cache(files)
                t0 = time.perf_counter()
                got, n = engine.retrieve(toks, out=out)
                results[path] = nbytes / (time.perf_counter() - t0)
                backend.batch_get_into = straight
                assert n == len(toks) and torch.equal(got, kv)
                out.zero_()
            engine.clear()
        for path, value in results.items():
            rows.setdefault(f"retrieve {path}", []).append(value)
            ratios.setdefault(f"retrieve {path} / dd iflag=direct", []).append(value / r)
        ratios.setdefault("into out / via read buffers", []).append(results["into out"] / results["via read buffers"])
        ratios.setdefault("store / dd oflag=direct", []).append(rows["store"][-1] / w)
    print(f"\nthrough the engine, disk-only stack, {nchunks} x 32 MiB chunks, cold reads into out=, "
          f"medians of {repeats} (order rotated); load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, values in rows.items():
        print(f"  {name:<28} {statistics.median(values) / 1e6:>7.0f} MB/s")
    for name, values in ratios.items():
        print(f"  {name:<40} {statistics.median(values):>5.2f}x  (rounds: {' '.join(f'{v:.2f}' for v in values)})")
    shutil.rmtree(root, ignore_errors=True)


async def main_async(args: argparse.Namespace, directory: str) -> None:
    if args.only in (None, "throughput"):
        await throughput(directory, args.chunks, args.repeats)
    if args.only in (None, "styles"):
        await io_styles(directory, args.repeats)
    if args.only in (None, "restart"):
        await restart(directory, args.restart_chunks, not args.no_engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--restart-chunks", type=int, default=10_000)
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--only", choices=["throughput", "styles", "restart", "engine"], default=None)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="kvstacks-disk-bench-", dir=args.dir)
    try:
        how = ("sync + echo 3 > /proc/sys/vm/drop_caches" if DROP_CACHES else
               "sync + posix_fadvise(DONTNEED) per file (/proc/sys/vm/drop_caches is not writable)")
        print(f"directory {directory}; cold reads: {how}")
        if args.only != "engine":
            asyncio.run(main_async(args, directory))
        if not args.no_engine and args.only in (None, "engine"):
            through_engine(directory, min(args.chunks, 8), args.repeats)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
