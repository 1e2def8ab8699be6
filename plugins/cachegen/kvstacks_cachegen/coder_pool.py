"""Coder worker processes, so a chunk's slabs (encode) or streams (decode) code on every core.

Each worker shares a file with this process (the arena, see
:mod:`kvstacks_cachegen.coder_worker`): a job's inputs are written there, the
worker writes its outputs there, and the pipes carry only job descriptions
and replies. Workers are borrowed without waiting: when none is idle the
caller codes in its own thread, so the pool never blocks or deadlocks a caller.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np

from kvstacks_cachegen.coder_worker import (
    DID_NOT_FIT,
    JOB_HEAD,
    OK,
    PART_HEAD,
    SLAB_HEAD,
    STREAM_HEAD,
    UNCODABLE,
    read_exact,
)
from kvstacks_cachegen.quantize import Uncodable
from kvstacks_cachegen.slabs import Slab, SlabPart
from kvstacks_cachegen.streams import ENCODE, SLABS, Stream, StreamError

ALIGN = 64
log = logging.getLogger("kvstacks.cachegen")


class WorkerFailed(RuntimeError):
    """A worker process died or broke protocol; its job must be redone or failed."""


def _shared_file() -> int:
    """A file descriptor for an anonymous file in memory (a plain temp file where there is no memfd)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("kvstacks-cachegen-arena", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


def _layout(op: int, items: list[Stream] | list[Slab]) -> tuple[list[tuple[int, int, int]], int]:
    """(input offset, output offset, output capacity) of each stream or slab in the arena, and its size."""
    places, end = [], 0
    for s in items:
        if op == SLABS:
            size_in = s.body.nbytes
            # Words of at most two parts: at most 15 bits a value (rans.PROB_BITS), plus the states.
            capacity = 2 * s.size + 256
        elif op == ENCODE:
            size_in = s.size
            # Worst case: 15 bits a symbol (rans.PROB_BITS), plus the states.
            capacity = 2 * s.size + 64
        else:
            size_in = s.words.nbytes
            capacity = s.size * s.dequant.dtype.itemsize
        at_in = end
        at_out = -(-(at_in + size_in) // ALIGN) * ALIGN
        end = -(-(at_out + capacity) // ALIGN) * ALIGN
        places.append((at_in, at_out, capacity))
    return places, end


class CoderWorker:
    def __init__(self) -> None:
        env = dict(os.environ)
        # One coder is single-threaded; keep numpy's BLAS from spawning threads in it.
        env.setdefault("OMP_NUM_THREADS", "1")
        # A fresh process's glibc serves each stream's temporaries (up to a few MB) with new
        # mmaps and hands them back on free: ~1,000 page faults per MB decoded at 1024-token
        # chunks, a third of the worker's time. Keep them on the heap and keep the heap.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(512 << 20))
        self.fd = _shared_file()
        self.size = 0
        self.map: mmap.mmap | None = None
        self.places: list[tuple[int, int, int]] = []
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstacks_cachegen.coder_worker", str(self.fd)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env, pass_fds=(self.fd,),
            )
        except OSError:
            os.close(self.fd)
            raise

    def _arena(self, size: int) -> np.ndarray:
        if size > self.size:
            size = max(size, 2 * self.size, 1 << 20)
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
            self.size = size
        return np.frombuffer(self.map, dtype=np.uint8)

    def send(self, op: int, items: list[Stream] | list[Slab], context: bytes = b"") -> None:
        """Write a job's inputs into the arena and its description down the pipe.
        ``context`` is the job-wide header of a slab job (``SLAB_JOB``)."""
        self.places, end = _layout(op, items)
        try:
            space = self._arena(end)
        except OSError as exc:
            raise WorkerFailed(f"cannot grow the coder arena to {end} bytes: {exc}") from None
        head = [JOB_HEAD.pack(op, len(items), self.size), context]
        tail = []
        for s, (at_in, at_out, capacity) in zip(items, self.places):
            if op == SLABS:
                space[at_in:at_in + s.body.nbytes] = s.body.reshape(-1).view(np.uint8)
                head.append(SLAB_HEAD.pack(s.body.shape[0], s.body.shape[1], s.bins, at_in, at_out, capacity))
            elif op == ENCODE:
                space[at_in:at_in + s.size] = s.symbols
                head.append(STREAM_HEAD.pack(len(s.counts), s.size, 0, at_in, at_out, capacity, 0, 0, 0, 0.0, s.coder))
                tail.append(np.asarray(s.counts, dtype="<u2").tobytes())
            else:
                d = s.dequant
                space[at_in:at_in + s.words.nbytes] = s.words.view(np.uint8)
                head.append(STREAM_HEAD.pack(len(s.counts), s.size, s.words.size, at_in, at_out, capacity,
                                             d.mean16.size, d.channels_last, d.dtype.itemsize == 4, d.clip,
                                             s.coder))
                tail += [np.asarray(s.counts, dtype="<u2").tobytes(), np.asarray(d.mean16, dtype="<f2").tobytes(),
                         np.asarray(d.std16, dtype="<f2").tobytes()]
        message = b"".join(head + tail)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(message)) + message)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WorkerFailed(f"coder worker is gone: {exc}") from None

    def receive(self, op: int, streams: list[Stream] | list[Slab]) -> None:
        head = read_exact(self.proc.stdout, 8)
        if head is None:
            raise WorkerFailed("coder worker closed its pipe")
        (length,) = struct.unpack("<Q", head)
        reply = read_exact(self.proc.stdout, length)
        if reply is None or not reply:
            raise WorkerFailed("coder worker reply was cut short")
        if reply[0] == UNCODABLE:
            raise Uncodable("a coder worker found statistics that overflow fp16")
        if reply[0] != OK:
            raise StreamError(reply[1:].decode(errors="replace"))
        if op == SLABS:
            self._receive_slabs(reply, streams)
            return
        results = struct.unpack_from(f"<{len(streams)}I", reply, 1)
        pos = 1 + 4 * len(streams)
        space = np.frombuffer(self.map, dtype=np.uint8)
        for s, n, (_, at_out, _) in zip(streams, results, self.places):
            if op == ENCODE:
                if n != DID_NOT_FIT:
                    s.words = space[at_out:at_out + 4 * n].view("<u4").copy()
                continue
            values = space[at_out:at_out + s.size * s.dequant.dtype.itemsize].view(s.dequant.dtype)
            if s.out is None:
                s.values = values.copy().reshape(s.dequant.shape(s.size))
            else:
                np.copyto(s.out, values.reshape(s.out.shape))
                s.values = s.out
            s.escapes = np.frombuffer(reply, dtype="<u4", count=n, offset=pos)
            pos += 4 * n

    def _receive_slabs(self, reply: bytes, slabs: list[Slab]) -> None:
        space = np.frombuffer(self.map, dtype=np.uint8)
        pos = 1
        for slab, (_, at_out, _) in zip(slabs, self.places):
            hidden = slab.body.shape[1]
            parts, pos = reply[pos], pos + 1
            cursor = at_out
            slab.parts = []
            for _ in range(parts):
                n_counts, n_esc, n_out = PART_HEAD.unpack_from(reply, pos)
                pos += PART_HEAD.size
                mean = np.frombuffer(reply, dtype="<f2", count=hidden, offset=pos)
                std = np.frombuffer(reply, dtype="<f2", count=hidden, offset=pos + 2 * hidden)
                escapes = np.frombuffer(reply, dtype="<u4", count=n_esc, offset=pos + 4 * hidden)
                pos += 4 * hidden + 4 * n_esc
                part = SlabPart(mean, std, escapes)
                if n_counts:
                    part.counts = np.frombuffer(reply, dtype=np.uint8, count=n_counts, offset=pos)
                    part.words = space[cursor:cursor + 4 * n_out].view("<u4").copy()
                    cursor += 4 * n_out
                else:
                    part.symbols = space[cursor:cursor + n_out].copy()
                    cursor += -(-n_out // 4) * 4
                pos += n_counts
                slab.parts.append(part)

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
        self.map = None
        try:
            os.close(self.fd)
        except OSError:
            pass


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
                if not self._spawn():
                    break

    def _spawn(self) -> bool:
        try:
            worker = CoderWorker()
        except OSError as exc:
            log.warning("cannot start a cachegen coder worker (%s); coding in the calling thread", exc)
            return False
        self.all.append(worker)
        self.idle.put(worker)
        return True

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
        """Return a borrowed worker; one that died or broke protocol is replaced by a new one."""
        if healthy and worker.proc.poll() is None:
            self.idle.put(worker)
            return
        worker.close()
        with self.lock:
            if worker in self.all:
                self.all.remove(worker)
                self._spawn()

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


#: the caller's share of a split, relative to a worker's: it also copies the workers' outputs
#: into place and assembles the chunk
CALLER_SHARE = 0.9


def run_split(op: int, items: list[Stream] | list[Slab], workers: list[CoderWorker], here,
              context: bytes = b"") -> tuple[set[int], BaseException | None]:
    """Code ``items``: a share to each borrowed worker, the rest with ``here(item)``
    in this thread, all at once. Returns the ids of workers that failed (their
    items are left uncoded for the caller to redo or to fail) and the first
    error met, for the caller to raise once it has given the workers back.
    Every worker that was sent a job is read back before this returns, so no
    reply is ever left in a pipe for the next job to mistake for its own."""
    shares: list[list] = [[] for _ in range(len(workers) + 1)]
    weights = [CALLER_SHARE] + [1.0] * len(workers)
    loads = [0.0] * len(shares)
    # Greedy by size, largest first, onto the share that finishes first.
    for s in sorted(items, key=lambda s: -s.size):
        i = min(range(len(shares)), key=lambda i: (loads[i] + s.size) / weights[i])
        shares[i].append(s)
        loads[i] += s.size
    failed: set[int] = set()
    sent = []
    for w, share in zip(workers, shares[1:]):
        if not share:
            continue
        try:
            w.send(op, share, context)
            sent.append((w, share))
        except WorkerFailed:
            failed.add(id(w))
            shares[0].extend(share)
    error: BaseException | None = None
    try:
        for s in shares[0]:
            here(s)
    except Exception as exc:  # noqa: BLE001 - handed to the caller once the workers have answered
        error = exc
    except BaseException:
        for w, _ in sent:  # interrupted: their replies would be left unread, so they must go
            w.proc.kill()
            w.proc.wait()
        raise
    for w, share in sent:
        try:
            w.receive(op, share)
        except WorkerFailed:
            failed.add(id(w))
        except Exception as exc:  # noqa: BLE001 - as above
            error = error or exc
    return failed, error
