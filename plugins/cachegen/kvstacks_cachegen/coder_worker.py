"""A coder process: runs ANS encode/decode jobs sent over its stdin, answers on stdout.

constriction holds the GIL while it codes, so threads cannot run two coders at
once; a few of these processes can. The protocol is length-prefixed binary
(no pickle): see :mod:`kvstacks_cachegen.coder_pool` for the message layout.
Run as ``python -m kvstacks_cachegen.coder_worker``; it exits when stdin closes.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

from kvstacks_cachegen.streams import StreamError, decode_stream, encode_stream

ENCODE, DECODE = 1, 2
STREAM_HEAD = struct.Struct("<HII")  # alphabet, symbols, words


def read_exact(stream, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def run_job(message: bytes) -> bytes:
    op, count = struct.unpack_from("<BI", message, 0)
    pos = 5
    heads = []
    for _ in range(count):
        heads.append(STREAM_HEAD.unpack_from(message, pos))
        pos += STREAM_HEAD.size
    counts = []
    for alphabet, _, _ in heads:
        counts.append(np.frombuffer(message, dtype="<u2", count=alphabet, offset=pos))
        pos += 2 * alphabet
    out = []
    if op == ENCODE:
        sizes = []
        for (alphabet, size, _), c in zip(heads, counts):
            symbols = np.frombuffer(message, dtype=np.uint8, count=size, offset=pos)
            pos += size
            words = encode_stream(symbols, c)
            sizes.append(len(words))
            out.append(words.tobytes())
        return b"\0" + struct.pack(f"<{count}I", *sizes) + b"".join(out)
    for (alphabet, size, nwords), c in zip(heads, counts):
        words = np.frombuffer(message, dtype="<u4", count=nwords, offset=pos).copy()
        pos += 4 * nwords
        out.append(decode_stream(words, size, c).astype(np.uint8).tobytes())
    return b"\0" + b"".join(out)


def main() -> None:
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    stdout = sys.stdout.buffer
    while True:
        head = read_exact(stdin, 8)
        if head is None:
            return
        (length,) = struct.unpack("<Q", head)
        message = read_exact(stdin, length)
        if message is None:
            return
        try:
            reply = run_job(message)
        except (StreamError, ValueError, struct.error) as exc:
            reply = b"\1" + str(exc).encode()[:1000]
        except BaseException as exc:  # noqa: BLE001 - a coder panic must become an error reply, not a dead pipe
            reply = b"\1" + f"{type(exc).__name__}: {exc}".encode()[:1000]
        stdout.write(struct.pack("<Q", len(reply)))
        stdout.write(reply)
        stdout.flush()


if __name__ == "__main__":
    main()
