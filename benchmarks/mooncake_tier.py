"""Mooncake tier throughput against a raw Mooncake client, same master, same run.

    python benchmarks/mooncake_tier.py [--sizes 8,32] [--batch 8] [--repeats 7]
                                       [--modes same,cross] [--parts 1[,2,8]] [--sliced]

Starts its own mooncake_master on free loopback ports (stopped by PID). For each chunk size
(fp16 KV, contiguous, already in memory) and each mode it measures, alternating the order of
the two every repeat:

- raw: the Mooncake client's zero-copy batch calls on registered buffers, ``batch_put_from``
  of a batch of keys, then ``batch_get_into`` of the same keys into registered buffers;
- ours: ``MooncakeBackend.batch_put`` of the same batch (kvstacks frames: header, payload
  and checksum; the payload sent from where it lies) and ``batch_get`` (into the tier's
  leased read slots, checksum verified, then released).

- ours, ``get into out``: ``MooncakeBackend.batch_get_into`` the caller's memory (the places
  ``retrieve(out=)`` hands a tier), plus the copy the engine makes of any chunk the tier
  returned in a read slot instead: against raw's get, which lands in the caller's memory too.

Both go through one client (the backend's) so they place and read chunks the same way.
``same``: that client lends the only segment, so chunks move within the process.
``cross``: it lends none (segment_bytes 0) and another process lends the segment, so every
chunk crosses processes over TCP on loopback. Each repeat uses fresh keys (Mooncake keeps an
existing value, so a put of a present key would cost nothing) and removes them afterwards.
``--sliced``: the chunks are slices of one longer KV along the tokens, as the engine hands
them to a tier (not contiguous: one run per [k/v, layer] block); raw sends the same runs
with ``batch_put_from_multi_buffers`` from where they lie, the tier does the same.
Figures are medians in GB/s of KV bytes; the ratio is ours over raw. ``--parts 1,2,8``
measures the tier with each of those ``pipeline_parts`` in the same run, rotated with raw.
Each is measured twice: ``N`` hashes every frame at put (a chunk handed over as it lies),
``N+check`` puts chunks that carry their frame check, as a cpu tier above hands them over
(it hashes each chunk while copying it in: ``kvstacks.frame.copy_checked``; that cost
belongs to the cpu tier's store and is not timed here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
os.environ.setdefault("GLOG_minloglevel", "2")

import torch  # noqa: E402
from kvstacks import frame  # noqa: E402
from kvstacks.keys import CacheKey  # noqa: E402
from kvstacks.memory import MemoryObj, contiguous_runs  # noqa: E402
from kvstacks_mooncake import MooncakeBackend  # noqa: E402

#: ``get into out``: batch_get_into the caller's places (retrieve(out=)), plus the engine's copy
#: of whatever the tier could not place there; raw's figure is its get (into the caller's memory)
OPS = ("put", "get", "get into out")

HOLDER = """
import os, sys, time
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
assert s.setup("127.0.0.1", "P2PHANDSHAKE", int(sys.argv[2]), 16 << 20, "tcp", "", sys.argv[1]) == 0
print("ready", flush=True)
sys.stdin.read()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_master(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "mooncake_master"
    proc = subprocess.Popen([str(exe), "--rpc_address=127.0.0.1", f"--rpc_port={port}", "--metrics_host=127.0.0.1",
                             f"--metrics_port={free_port()}"], stdout=open(workdir / "master.log", "wb"),
                            stderr=subprocess.STDOUT)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mooncake_master did not start")


def chunk(size_mib: int, seed: int) -> torch.Tensor:
    tokens = size_mib * (1 << 20) // (2 * 32 * 1024 * 2)  # [2, 32 layers, tokens, 1024] fp16
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 32, tokens, 1024), generator=g).to(torch.float16)


def sliced_chunks(size_mib: int, batch: int) -> list[torch.Tensor]:
    """The batch as the engine hands it to a tier: slices of one longer KV along the tokens."""
    whole = chunk(size_mib * batch, 0)
    return list(whole.split(whole.shape[2] // batch, dim=2))


def raw_round(store, names: list[str], src: list[torch.Tensor], dst: list[torch.Tensor]) -> tuple[float, float]:
    sizes = [t.numel() * t.element_size() for t in src]
    t0 = time.perf_counter()
    if src[0].is_contiguous():
        codes = store.batch_put_from(names, [t.data_ptr() for t in src], sizes)
    else:  # a slice goes as its contiguous runs, from where they lie
        runs = [contiguous_runs(t) for t in src]
        codes = store.batch_put_from_multi_buffers(names, [[r.data_ptr() for r in rs] for rs in runs],
                                                   [[r.numel() * r.element_size() for r in rs] for rs in runs])
    t1 = time.perf_counter()
    got = store.batch_get_into(names, [t.data_ptr() for t in dst], [t.numel() for t in dst])
    t2 = time.perf_counter()
    assert all(c == 0 for c in codes) and list(got) == sizes, (codes, got)
    store.batch_remove(names, True)
    return t1 - t0, t2 - t1


async def our_round(backend: MooncakeBackend, model: str, src: list[torch.Tensor], places: list[torch.Tensor],
                    carried: bool = False) -> tuple[float, float, float]:
    keys = [CacheKey(model, "kv", 1, 0, uuid.uuid4().bytes) for _ in src]
    items = [(k, MemoryObj.from_kv(k, t)) for k, t in zip(keys, src)]
    if carried:
        # what a cpu tier above hands over: the check computed as it copied the chunk in
        # (that cost is the cpu store's, measured by vs_lmcache.py --only cpu), not timed here
        for _, obj in items:
            obj.check = int.from_bytes(frame.checksum(frame.header(obj), obj.payload()), "little")
    t0 = time.perf_counter()
    await backend.batch_put(items)
    t1 = time.perf_counter()
    objs = await backend.batch_get(keys)
    t2 = time.perf_counter()
    assert all(o is not None and o.data.shape == t.shape for o, t in zip(objs, src))
    for o in objs:
        backend.release_now(o)
    # into the caller's memory, as retrieve(out=) reads: what the tier could not place there, the
    # engine copies there
    t3 = time.perf_counter()
    objs = await backend.batch_get_into(keys, places)
    for o, place in zip(objs, places):
        assert o is not None
        if o.data is not place:
            place.copy_(o.data)
            backend.release_now(o)
    t4 = time.perf_counter()
    await backend._call("remove", backend._remove_blocking, [backend._name(k) for k in keys])
    return t1 - t0, t2 - t1, t4 - t3


async def measure(master: str, mode: str, size_mib: int, batch: int, repeats: int,
                  parts: list[int], sliced: bool = False) -> dict[str, float]:
    holder = None
    if mode == "cross":
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, master, str(batch * size_mib * 2 << 20)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert holder.stdout.readline().strip() == "ready"
    segment = 0 if mode == "cross" else batch * size_mib * 2 << 20
    backend = MooncakeBackend(MooncakeBackend.Options(
        master=master, prefix=f"bench-{mode}:", segment_bytes=segment, local_buffer_bytes=16 << 20,
        read_buffer_bytes=2 * batch * (size_mib + 1) << 20, timeout=60.0, keep_client=False))
    await backend.start()
    store = backend.store
    try:
        src = sliced_chunks(size_mib, batch) if sliced else [chunk(size_mib, seed) for seed in range(batch)]
        dst = [torch.zeros(t.numel() * 2 + 4096, dtype=torch.uint8) for t in src]
        if sliced:  # raw sends from the KV registered where it lies, as the tier does
            whole = src[0].untyped_storage()
            assert store.register_buffer(whole.data_ptr(), whole.nbytes()) == 0
        for t in dst:
            assert store.register_buffer(t.data_ptr(), t.numel()) == 0
        out = torch.zeros((2, 32, sum(t.shape[2] for t in src), 1024), dtype=torch.float16)
        places = list(out.split(src[0].shape[2], dim=2)) if sliced else [torch.zeros_like(t) for t in src]
        nbytes = sum(t.numel() * t.element_size() for t in src)
        systems: list[str | int] = ["raw", *parts, *(f"{p}+check" for p in parts)]
        runs: dict[str, list[float]] = {f"{who} {op}": [] for who in systems for op in OPS}
        # the tier registers the source chunks where they lie on its first put; raw sends from the same memory
        await our_round(backend, "warm", src, places)
        raw_round(store, [f"warm-{uuid.uuid4().hex}-{i}" for i in range(batch)], src, dst)  # fault pages in
        for r in range(repeats):
            shift = r % len(systems)
            for who in systems[shift:] + systems[:shift]:  # every system first in turn
                if who == "raw":
                    put, get = raw_round(store, [f"raw-{uuid.uuid4().hex}-{i}" for i in range(batch)], src, dst)
                    get_into = get  # raw reads into the caller's (registered) memory either way
                else:
                    backend.options.pipeline_parts = int(str(who).split("+")[0])
                    put, get, get_into = await our_round(backend, f"bench-{r}", src, places,
                                                         carried=str(who).endswith("+check"))
                for op, seconds in zip(OPS, (put, get, get_into)):
                    runs[f"{who} {op}"].append(nbytes / seconds / 1e9)
        for t in dst:
            store.unregister_buffer(t.data_ptr())
        if sliced:
            store.unregister_buffer(src[0].untyped_storage().data_ptr())
        return {name: statistics.median(v) for name, v in runs.items()}
    finally:
        backend.options.close_timeout = 10.0
        await backend.close()
        if holder is not None:
            # a clean exit unmounts its segment; a killed one stays listed for the master's client_ttl
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,32", help="chunk sizes in MiB")
    ap.add_argument("--batch", type=int, default=8, help="chunks per batch call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", default="same,cross")
    ap.add_argument("--parts", default="1", help="the tier's pipeline_parts; several (1,2,8) are measured side by side")
    ap.add_argument("--sliced", action="store_true",
                    help="chunks as the engine hands them: slices of one longer KV (runs of [k/v, layer] blocks)")
    args = ap.parse_args()
    parts = [int(p) for p in args.parts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        master, address = start_master(Path(tmp))
        try:
            print(f"mooncake_master at {address}; batches of {args.batch} chunks; medians of {args.repeats}, GB/s")
            print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            print("| mode | chunk | op | raw Mooncake | parts | ours | ours / raw |")
            print("|---|---|---|---|---|---|---|")
            for mode in args.modes.split(","):
                for size in (int(s) for s in args.sizes.split(",")):
                    m = asyncio.run(measure(address, mode, size, args.batch, args.repeats, parts, args.sliced))
                    for op in OPS:
                        raw = m[f"raw {op}"]
                        for p in [*parts, *(f"{p}+check" for p in parts)]:
                            ours = m[f"{p} {op}"]
                            print(f"| {mode} | {size} MiB{' sliced' if args.sliced else ''} | {op} | {raw:.2f} | {p} | {ours:.2f} | {ours / raw:.0%} |",
                                  flush=True)
            print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        finally:
            os.kill(master.pid, signal.SIGTERM)
            master.wait(timeout=10)


if __name__ == "__main__":
    main()
