"""File I/O for chunk files: buffered or O_DIRECT, into reusable aligned buffers.

O_DIRECT needs the buffer address, the length and the file offset aligned to the
device block. A frame's length is arbitrary, so a direct write copies the frame
into an aligned staging buffer, writes the whole blocks direct and the last
partial block buffered (a truncate of a direct-written file would make the
filesystem read and zero that block: measured 4 ms); a direct read reads whole
blocks (the kernel stops at the end of the file). Fresh memory costs a page fault per 4 KiB on first touch,
which on a VM can cost more than the disk read, so buffers are reused.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading

import numpy as np
import torch
import xxhash
from kvstacks.frame import encode_parts, header
from kvstacks.memory import MemoryObj
from kvstacks.readbuffers import ReadBuffers

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
OPEN_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC
OPEN_READ = os.O_RDONLY | _CLOEXEC


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class AlignedBuffers(ReadBuffers):
    """Reusable ``ALIGN``-aligned ``uint8`` tensors, sizes rounded up to whole blocks."""

    def take(self, nbytes: int) -> torch.Tensor:
        return super().take(aligned(max(nbytes, 1)))

    def make(self, size: int) -> torch.Tensor:
        raw = torch.empty(size + ALIGN, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % ALIGN
        return raw[offset : offset + size]


def encode_into(obj: MemoryObj, buffer: torch.Tensor) -> int:
    """Write ``obj``'s frame (``kvstacks.frame``, byte for byte) into ``buffer``; return its length.

    The payload is copied straight from ``obj.data``, strided or not: a chunk
    sliced out of a longer KV costs one copy here instead of ``contiguous()``
    into fresh memory plus a copy into the staging buffer.
    """
    head = header(obj)
    start, payload = len(head), obj.nbytes
    end = start + payload
    view = memoryview(buffer.numpy())
    view[:start] = head
    if payload:
        src = obj.data.detach()
        if src.stride(-1) != 1:
            src = src.contiguous()
        as_bytes = src if src.dtype == torch.uint8 else src.view(torch.uint8)
        dst = buffer[start:end].view(as_bytes.shape)
        if as_bytes.device.type == "cpu" and as_bytes.is_contiguous():
            # numpy's copy is one thread and releases the GIL; torch's spreads over
            # OpenMP threads that wait on each other when the cores are busy
            # (measured here: 4-20 ms against 15-28 ms for 32 MiB). For a strided
            # chunk (a slice of a longer KV) torch's copy measured faster.
            np.copyto(dst.numpy(), as_bytes.numpy())
        else:
            dst.copy_(as_bytes)
    struct.pack_into("<Q", view, end, xxhash.xxh3_64(view[:end]).intdigest())
    return end + 8


def write_file(fd: int, obj: MemoryObj, direct: bool, staging: AlignedBuffers) -> None:
    """Write ``obj``'s frame at the start of ``fd``."""
    data = obj.data
    if not direct and data.is_contiguous() and data.device.type == "cpu" and not data.requires_grad:
        _write_all(fd, [memoryview(p).cast("B") for p in encode_parts(obj)])
        return
    buffer = staging.take(len(header(obj)) + obj.nbytes + 8)
    try:
        total = encode_into(obj, buffer)
        view = memoryview(buffer.numpy())
        body = total - total % ALIGN if direct else total
        if body:
            _write_all(fd, [view[:body]])
        if body != total:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
            os.lseek(fd, body, os.SEEK_SET)
            _write_all(fd, [view[body:total]])
    finally:
        staging.give_back(buffer)


def read_file(path: str, direct: bool, buffers: AlignedBuffers) -> tuple[torch.Tensor, memoryview, os.stat_result] | None:
    """``(buffer, view of the file's bytes, stat)`` or None if there is no file."""
    try:
        fd = os.open(path, OPEN_READ | (O_DIRECT if direct else 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        buffer = buffers.take(st.st_size)
        view = memoryview(buffer.numpy())
        got = 0
        while got < st.st_size:
            if direct and got % ALIGN:
                # A short direct read in mid-file leaves an unaligned offset; finish buffered.
                got += _pread_all(path, view[got : st.st_size], got)
                break
            n = os.preadv(fd, [view[got:]], got)
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    return buffer, view[: min(got, st.st_size)], st


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _pread_all(path: str, view: memoryview, offset: int) -> int:
    fd = os.open(path, OPEN_READ)
    try:
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got
    finally:
        os.close(fd)


def supports_direct(directory: str) -> bool:
    """Whether files in ``directory`` can be opened O_DIRECT (not on tmpfs, for one)."""
    if not O_DIRECT:
        return False
    probe = os.path.join(directory, f".kvstacks-direct-probe.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(probe, OPEN_WRITE | O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buffer = AlignedBuffers(0).take(ALIGN)
        os.write(fd, memoryview(buffer.numpy()))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)
