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
#: iovecs per preadv call (the kernel refuses more)
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


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
    check = obj.check  # carried from where the bytes were hot (kvstacks.frame.copy_checked)
    struct.pack_into("<Q", view, end, xxhash.xxh3_64(view[:end]).intdigest() if check is None else check)
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


def runs(place: torch.Tensor) -> list[memoryview] | None:
    """``place``'s bytes as the contiguous runs a chunk's payload fills, in order; None if it has none.

    ``place`` is ``[2, layers, tokens, hidden]``, usually a slice of a longer KV along the
    tokens: one run per K or V of a layer, or a single run when the slice is contiguous.
    """
    if place.device.type != "cpu" or place.dim() != 4:
        return None
    if place.is_contiguous():
        return [memoryview(place.reshape(-1).view(torch.uint8).numpy())]
    if not place[0, 0].is_contiguous():
        return None
    return [memoryview(place[kv, layer].reshape(-1).view(torch.uint8).numpy())
            for kv in range(place.shape[0]) for layer in range(place.shape[1])]


def read_into(path: str, head: bytes, payload: list[memoryview], direct: bool) -> tuple[str, os.stat_result] | None:
    """Read a frame whose header should be ``head`` with its payload straight into ``payload``.

    Returns None if there is no file, else ``(outcome, stat)``: ``"read"`` when the file is
    exactly that header, a payload of the runs' size and a valid checksum; ``"other"`` when
    its size or header differ (another layout, a compressed or a lying chunk: read it the
    general way, which decodes it and says what it holds); ``"corrupt"`` when the header
    matched and the checksum did not. The read is buffered: O_DIRECT would need the payload
    at an aligned file offset, and it follows a header of any length. With ``direct`` the
    pages read are dropped from the page cache afterwards, as O_DIRECT would not have kept them.
    """
    try:
        fd = os.open(path, OPEN_READ)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size != len(head) + sum(len(run) for run in payload) + 8:
            return "other", st
        got_head, check = bytearray(len(head)), bytearray(8)
        done = _pread_views(fd, [memoryview(got_head), *payload, memoryview(check)])
        if direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if done != st.st_size or got_head != head:
        return "other", st
    digest = xxhash.xxh3_64(head)
    for run in payload:
        digest.update(run)
    return ("read" if struct.unpack("<Q", check)[0] == digest.intdigest() else "corrupt"), st


def _pread_views(fd: int, views: list[memoryview]) -> int:
    """Fill ``views`` from the start of ``fd`` in order; return the bytes read (short at end of file)."""
    offset, i = 0, 0
    while i < len(views):
        batch = views[i : i + IOV_MAX]
        n = os.preadv(fd, batch, offset)
        if n == 0:
            break
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return offset


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
