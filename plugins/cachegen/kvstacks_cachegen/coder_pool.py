"""Coder worker processes, so two chunks' (or one chunk's) streams code at once.

Message to a worker: ``u64 length`` then ``u8 op, u32 streams``, per stream
``u16 alphabet, u32 symbols, u32 words``, per stream ``alphabet x u16`` counts,
then the data (symbols as bytes to encode, or words to decode). Reply:
``u64 length`` then ``u8 status`` (0 ok) and the words (after ``streams x u32``
word counts) or the symbols; on error, a message.

Workers are borrowed without waiting: when none is idle the caller codes in
its own thread, so the pool never blocks or deadlocks a caller.
"""

from __future__ import annotations

import atexit
import os
import queue
import struct
import subprocess
import sys
import threading

import numpy as np

from kvstacks_cachegen.coder_worker import ENCODE, STREAM_HEAD, read_exact
from kvstacks_cachegen.streams import Stream, StreamError


class WorkerFailed(RuntimeError):
    """A worker process died or broke protocol; its job must be redone or failed."""


class CoderWorker:
    def __init__(self) -> None:
        env = dict(os.environ)
        # One coder is single-threaded; keep numpy's BLAS from spawning threads in it.
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstacks_cachegen.coder_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
        )

    def send(self, op: int, streams: list[Stream]) -> None:
        head = [struct.pack("<BI", op, len(streams))]
        for s in streams:
            words = 0 if op == ENCODE else len(s.words)
            head.append(STREAM_HEAD.pack(len(s.counts), s.size, words))
        for s in streams:
            head.append(np.asarray(s.counts, dtype="<u2").tobytes())
        body = [s.symbols.astype(np.uint8) if op == ENCODE else s.words for s in streams]
        length = sum(len(h) for h in head) + sum(b.nbytes for b in body)
        try:
            self.proc.stdin.write(struct.pack("<Q", length) + b"".join(head))
            for b in body:
                self.proc.stdin.write(memoryview(np.ascontiguousarray(b)).cast("B"))
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WorkerFailed(f"coder worker is gone: {exc}") from None

    def receive(self, op: int, streams: list[Stream]) -> None:
        head = read_exact(self.proc.stdout, 8)
        if head is None:
            raise WorkerFailed("coder worker closed its pipe")
        (length,) = struct.unpack("<Q", head)
        reply = read_exact(self.proc.stdout, length)
        if reply is None or not reply:
            raise WorkerFailed("coder worker reply was cut short")
        if reply[0] != 0:
            raise StreamError(reply[1:].decode(errors="replace"))
        pos = 1
        if op == ENCODE:
            sizes = struct.unpack_from(f"<{len(streams)}I", reply, pos)
            pos += 4 * len(streams)
            for s, n in zip(streams, sizes):
                s.words = np.frombuffer(reply, dtype="<u4", count=n, offset=pos)
                pos += 4 * n
        else:
            for s in streams:
                s.symbols = np.frombuffer(reply, dtype=np.uint8, count=s.size, offset=pos)
                pos += s.size

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CoderPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: queue.SimpleQueue[CoderWorker] = queue.SimpleQueue()
        self.all: list[CoderWorker] = []
        self.lock = threading.Lock()
        self.started = False

    def _start(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
            for _ in range(self.size):
                try:
                    worker = CoderWorker()
                except OSError:
                    break
                self.all.append(worker)
                self.idle.put(worker)

    def borrow(self, most: int) -> list[CoderWorker]:
        self._start()
        got = []
        while len(got) < most:
            try:
                got.append(self.idle.get_nowait())
            except queue.Empty:
                break
        return got

    def give_back(self, worker: CoderWorker, healthy: bool = True) -> None:
        if healthy and worker.proc.poll() is None:
            self.idle.put(worker)
        else:
            worker.close()

    def close(self) -> None:
        for worker in self.all:
            worker.close()
        self.all.clear()


_pools: dict[tuple[int, int], CoderPool] = {}
_pools_lock = threading.Lock()


def shared_pool(size: int) -> CoderPool | None:
    """The process-wide pool with ``size`` workers (None when size is 0).

    Keyed by process id too: a forked child (a server's worker processes) must
    not talk to its parent's coders over inherited pipes.
    """
    if size <= 0:
        return None
    with _pools_lock:
        key = (os.getpid(), size)
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = CoderPool(size)
        return pool


@atexit.register
def _close_pools() -> None:
    for (pid, _), pool in _pools.items():
        if pid == os.getpid():
            pool.close()


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cpus - 1, 4))


def run_split(op: int, streams: list[Stream], workers: list[CoderWorker], here) -> set[int]:
    """Code ``streams``: a share to each borrowed worker, the rest with ``here(stream)``
    in this thread, all at once. Returns ids of workers that failed (their
    streams are left uncoded for the caller to redo or to fail)."""
    total = sum(s.size for s in streams) or 1
    shares: list[list[Stream]] = [[] for _ in range(len(workers) + 1)]
    # Greedy by size, largest first, onto the least loaded share.
    loads = [0] * len(shares)
    for s in sorted(streams, key=lambda s: -s.size):
        i = loads.index(min(loads))
        shares[i].append(s)
        loads[i] += s.size
    del total
    failed: set[int] = set()
    sent = []
    for w, share in zip(workers, shares[1:]):
        if not share:
            continue
        try:
            w.send(op, share)
            sent.append((w, share))
        except WorkerFailed:
            failed.add(id(w))
            shares[0].extend(share)
    for s in shares[0]:
        here(s)
    error: StreamError | None = None
    for w, share in sent:
        try:
            w.receive(op, share)
        except WorkerFailed:
            failed.add(id(w))
        except StreamError as exc:
            error = error or exc
    if error is not None:
        raise error
    return failed
