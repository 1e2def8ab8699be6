"""The builtin tcp transfer channel between two sockets on loopback."""

from __future__ import annotations

import socket
import struct

import pytest
import torch
from kvstacks.builtin.transfer import TcpChannel
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.plugins import registry
from kvstacks.testing import free_port
from kvstacks.transfer import TransferError


def objs(n: int = 3) -> list[MemoryObj]:
    out = []
    for i in range(n):
        kv = torch.randn(2, 2, 4, 8).to(torch.float16)
        out.append(MemoryObj.from_kv(CacheKey("m", "kv", 1, 0, bytes([i]) * 16), kv))
    return out


@pytest.fixture
def receiver():
    received: list = []

    def receive(items, meta):
        received.append((items, meta))
        if meta.get("refuse"):
            raise ValueError("tier 'nope' does not exist")
        return {"num_tokens": sum(o.num_tokens for o in items)}

    channel = TcpChannel()
    address = channel.listen("127.0.0.1", 0, receive, token="secret")
    yield channel, address, received
    channel.close()


def test_tcp_is_registered():
    assert registry().get("transfer_channels", "tcp") is TcpChannel


def test_round_trip_keeps_keys_and_bytes(receiver):
    _, address, received = receiver
    sent = objs()
    answer = TcpChannel().send(address, sent, {"tier": "cpu"}, timeout=10, token="secret")
    assert answer == {"num_tokens": 12}
    ((got, meta),) = received
    assert meta == {"tier": "cpu", "count": 3}
    for a, b in zip(sent, got, strict=True):
        assert a.key == b.key and torch.equal(a.data, b.data)


def test_wrong_token_is_refused_before_any_chunk_is_read(receiver):
    _, address, received = receiver
    with pytest.raises(TransferError, match="KVSTACKS_WORKER_TOKEN"):
        TcpChannel().send(address, objs(), {}, timeout=10, token="wrong")
    assert received == []


def test_a_receiver_refusal_comes_back_with_its_reason(receiver):
    _, address, _ = receiver
    with pytest.raises(TransferError, match="tier 'nope' does not exist"):
        TcpChannel().send(address, objs(1), {"refuse": True}, timeout=10, token="secret")


def _raw(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_garbage_and_corrupt_frames_are_refused_and_the_receiver_lives(receiver):
    _, address, received = receiver
    answer = _raw(address, b"GET / HTTP/1.1\r\n\r\n")
    assert b"bad magic" in answer
    from kvstacks import frame

    good = frame.encode(objs(1)[0])
    bad = bytearray(good)
    bad[-20] ^= 0xFF
    meta = b'{"token": "secret", "count": 1}'
    answer = _raw(
        address,
        b"KVTX" + bytes([1]) + struct.pack("<I", len(meta)) + meta + struct.pack("<Q", len(bad)) + bytes(bad),
    )
    assert b"checksum" in answer
    meta = b'{"token": "secret", "count": 1}'
    answer = _raw(
        address, b"KVTX" + bytes([1]) + struct.pack("<I", len(meta)) + meta + struct.pack("<Q", 1 << 40)
    )
    assert b"above the limits" in answer
    assert received == []
    assert TcpChannel().send(address, objs(1), {}, timeout=10, token="secret") == {"num_tokens": 4}


def test_unreachable_peer_is_a_transfer_error():
    with pytest.raises(TransferError, match="failed"):
        TcpChannel().send(f"127.0.0.1:{free_port()}", objs(1), {}, timeout=2)
    with pytest.raises(TransferError, match="host:port"):
        TcpChannel().send("nowhere", objs(1), {}, timeout=2)
