"""The one chunk format for bytes on disk and on the wire.

Layout, little-endian::

    magic   4s   b"KVSC"
    version u8   1
    dtype   u8   code from kvstacks.memory.DTYPES (of the decoded KV)
    ndim    u8
    namelen u8   length of the compressor name
    keylen  u16  length of the key string
    paylen  u64  payload length
    shape   ndim x u32
    name    namelen bytes (ascii)
    key     keylen bytes (utf-8, CacheKey.to_string())
    payload paylen bytes
    check   u64  xxh3_64 of everything above

A truncated or corrupted frame raises CorruptChunk. Nothing here unpickles.

The check is computed once per chunk where its bytes are hot: ``copy_checked`` copies a
chunk in blocks and hashes each block right after copying it (the cpu tier stores that
way when a tier below writes frames), and the object carries the result
(``MemoryObj.check``). Every writer below sends the carried check instead of reading the
whole payload from memory a second time; the frame's bytes are the same either way.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import xxhash

from kvstacks.errors import CorruptChunk
from kvstacks.keys import CacheKey
from kvstacks.memory import DTYPE_FROM_CODE, DTYPES, MemoryObj, contiguous_runs

MAGIC = b"KVSC"
VERSION = 1
_FIXED = struct.Struct("<4sBBBBHQ")
_CHECK = struct.Struct("<Q")
MAX_NDIM = 8
#: bytes ``copy_checked`` copies before hashing them: the block is still in the core's L2
#: (2 MiB here) when it is hashed, so the check costs a fraction of a pass over memory
BLOCK = 256 << 10

# Decoded chunks are only ever read (the engine copies them out), so a tensor over a
# read-only buffer (redis returns bytes) is safe and saves a copy of every payload.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def header(obj: MemoryObj, payload_len: int | None = None) -> bytes:
    name = obj.compressor.encode("ascii")
    key = obj.key.to_string().encode("utf-8")
    paylen = obj.nbytes if payload_len is None else payload_len
    return (
        _FIXED.pack(MAGIC, VERSION, DTYPES[obj.dtype], len(obj.shape), len(name), len(key), paylen)
        + struct.pack(f"<{len(obj.shape)}I", *obj.shape)
        + name
        + key
    )


def encode_parts(obj: MemoryObj) -> list[bytes | memoryview]:
    """The frame as parts to write one after another (no copy of the payload)."""
    head = header(obj)
    payload = obj.payload()
    return [head, payload, check_field(obj, head, payload)]


def check_field(obj: MemoryObj, head: bytes, *payload: bytes | memoryview) -> bytes:
    """The frame's last field: the check ``obj`` carries, else computed over ``head`` and ``payload``."""
    if obj.check is not None:
        return _CHECK.pack(obj.check)
    return checksum(head, *payload)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, head: bytes) -> int:
    """Copy ``src`` into ``dst`` (contiguous, same shape and dtype); return the frame check of
    ``head`` followed by the copied bytes (``MemoryObj.check`` of the copy).

    The copy goes in ``BLOCK``-sized pieces, each hashed right after it was copied, while it
    is still in the cache: one pass over memory where a copy and a later check take two.
    The hash reads the copy, not the source, so it covers exactly the bytes ``dst`` holds.
    """
    out = dst.reshape(-1).view(torch.uint8)
    check = xxhash.xxh3_64(head)
    runs = contiguous_runs(src, BLOCK // 4) if src.device.type == "cpu" else None
    if runs is None:
        # short runs (a gather is cheaper in one torch copy) or another device: copy, then hash
        dst.copy_(src)
        flat = out.numpy()
        for start in range(0, len(flat), BLOCK):
            check.update(flat[start : start + BLOCK])
        return check.intdigest()
    flat = out.numpy()
    offset = 0
    for run in runs:
        piece = run.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, len(piece), BLOCK):
            part = piece[start : start + BLOCK]
            block = flat[offset : offset + len(part)]
            # numpy's copy is one thread and releases the GIL (torch's waits on OpenMP
            # threads, which measured far slower than one thread in blocks this size)
            np.copyto(block, part)
            check.update(block)
            offset += len(part)
    return check.intdigest()


def encode_streamed(obj: MemoryObj) -> tuple[int, Iterator[bytes | memoryview]]:
    """The frame's size, and its parts as they are consumed: the payload as its contiguous
    runs (``MemoryObj.payload_runs``, so not even a sliced chunk is copied), the checksum
    computed run by run on the way (or the one the object carries). A sender that sends
    each run right after it was hashed starts at once and reads the run again while it is
    still in the cache."""
    head = header(obj)

    carried = obj.check  # read once: the cpu pool may clear it while the frame is being sent

    def parts() -> Iterator[bytes | memoryview]:
        check = xxhash.xxh3_64(head) if carried is None else None
        yield head
        for run in obj.payload_runs():
            if check is not None:
                check.update(run)
            yield run
        yield _CHECK.pack(carried if check is None else check.intdigest())

    return len(head) + obj.nbytes + _CHECK.size, parts()


def checksum(head: bytes, *payload: bytes | memoryview) -> bytes:
    """The frame's last field, for a frame written as parts (``header`` then the payload, maybe in runs)."""
    check = xxhash.xxh3_64(head)
    for run in payload:
        check.update(run)
    return _CHECK.pack(check.intdigest())


def encode(obj: MemoryObj) -> bytes:
    return b"".join(encode_parts(obj))


def frame_size(obj: MemoryObj) -> int:
    return len(header(obj)) + obj.nbytes + _CHECK.size


#: bytes at the start of a frame that ``length`` needs
LENGTH_FIELDS = _FIXED.size


def length(start: bytes | memoryview) -> int | None:
    """The whole frame's length, read from its first ``LENGTH_FIELDS`` bytes; None if they
    do not start a frame (so a frame stored in pieces is found from its first piece)."""
    if len(start) < _FIXED.size:
        return None
    magic, version, _, ndim, namelen, keylen, paylen = _FIXED.unpack_from(start, 0)
    if magic != MAGIC or version != VERSION:
        return None
    return _FIXED.size + 4 * ndim + namelen + keylen + paylen + _CHECK.size


#: bytes of the check field that ends every frame
CHECK_BYTES = _CHECK.size


class RunningCheck:
    """A frame's checksum computed as its bytes arrive: a receiver feeds it every piece in
    order, each right after receiving it (still in the cache), and ``decode`` then takes
    the result instead of reading the whole frame again."""

    def __init__(self, size: int) -> None:
        self._left = max(size - _CHECK.size, 0)  # the last field is not part of the sum
        self._hash = xxhash.xxh3_64()

    def update(self, piece: bytes | memoryview) -> None:
        take = min(len(piece), self._left)
        if take:
            self._hash.update(piece[:take])
            self._left -= take

    def result(self) -> int | None:
        """The checksum, once every byte it covers was fed; else None."""
        return self._hash.intdigest() if self._left == 0 else None


def check_matches(running: RunningCheck, field: bytes) -> bool:
    """Whether a frame's check ``field`` (its last ``CHECK_BYTES``) is the sum ``running`` was fed."""
    computed = running.result()
    return computed is not None and _CHECK.unpack(field)[0] == computed


def decode(
    buf: bytes | bytearray | memoryview, expect_key: CacheKey | None = None, running: RunningCheck | None = None
) -> MemoryObj:
    """Parse and verify a frame; the returned tensor shares ``buf``'s memory when writable.

    ``running``, if given, was fed all of ``buf`` as it was received: its sum is checked
    instead of computing one."""
    view = memoryview(buf).cast("B")
    if len(view) < _FIXED.size + _CHECK.size:
        raise CorruptChunk(f"chunk is truncated ({len(view)} bytes)")
    magic, version, dtype_code, ndim, namelen, keylen, paylen = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptChunk("not a kvstacks chunk (bad magic)")
    if version != VERSION:
        raise CorruptChunk(f"chunk format version {version} is not supported (this kvstacks reads {VERSION})")
    if dtype_code not in DTYPE_FROM_CODE or ndim > MAX_NDIM:
        raise CorruptChunk("chunk header is corrupt (dtype or rank)")
    offset = _FIXED.size
    end_of_header = offset + 4 * ndim + namelen + keylen
    if len(view) != end_of_header + paylen + _CHECK.size:
        raise CorruptChunk(
            f"chunk is truncated or padded: header says {end_of_header + paylen + _CHECK.size} bytes, got {len(view)}"
        )
    computed = running.result() if running is not None else None
    if computed is None:
        computed = xxhash.xxh3_64(view[: end_of_header + paylen]).intdigest()
    (stored,) = _CHECK.unpack_from(view, end_of_header + paylen)
    if computed != stored:
        raise CorruptChunk("chunk checksum mismatch")
    shape = struct.unpack_from(f"<{ndim}I", view, offset)
    offset += 4 * ndim
    try:
        compressor = bytes(view[offset : offset + namelen]).decode("ascii")
        key = CacheKey.from_string(bytes(view[offset + namelen : end_of_header]).decode("utf-8"))
    except Exception as exc:
        raise CorruptChunk(f"chunk header is corrupt: {exc}") from exc
    if expect_key is not None and key != expect_key:
        raise CorruptChunk(f"chunk holds key {key} where {expect_key} was expected")
    dtype = DTYPE_FROM_CODE[dtype_code]
    payload = view[end_of_header : end_of_header + paylen]
    raw = torch.frombuffer(payload, dtype=torch.uint8) if paylen else torch.empty(0, dtype=torch.uint8)
    if compressor == "none":
        expected = 1
        for d in shape:
            expected *= d
        expected *= torch.empty((), dtype=dtype).element_size()
        if expected != paylen:
            raise CorruptChunk("chunk payload does not match its shape")
        data = raw.view(dtype).view(shape)
    else:
        data = raw
    return MemoryObj(key, data, tuple(shape), dtype, compressor)
