"""The nixl transfer channel with real NIXL agents (UCX over loopback), sender and receiver in
this process; tests/integration/test_p2p.py runs it between worker processes."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.testing import require
from kvstacks.transfer import TransferError

TOKEN = "worker-secret"


class Receiver:
    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[CacheKey, torch.Tensor, str]], dict]] = []
        self.fail: Exception | None = None

    def __call__(self, objs, meta):
        if self.fail is not None:
            raise self.fail
        # Copy: the channel reuses its buffer once this returns.
        self.calls.append(([(o.key, o.data.clone(), o.compressor) for o in objs], meta))
        return {"num_tokens": sum(o.num_tokens for o in objs)}


@pytest.fixture(scope="module")
def pair():
    require("nixl._api", "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1")
    from kvstacks_nixl import NixlChannel

    receiver = Receiver()
    into = NixlChannel(NixlChannel.Options(max_chunks=64))
    address = into.listen("127.0.0.1", 0, receiver, TOKEN)
    out = NixlChannel()
    yield out, into, address, receiver
    into.close()


def key(i: int) -> CacheKey:
    return CacheKey("m", "kv", 1, 0, bytes([i]) * 16)


def test_chunks_of_every_dtype_and_compressed_ones_arrive_intact(pair):
    out, _, address, receiver = pair
    receiver.calls.clear()
    objs = [
        MemoryObj.from_kv(key(1), torch.randn(2, 3, 16, 64).to(torch.float16)),
        MemoryObj.from_kv(key(2), torch.randn(2, 3, 5, 64).to(torch.bfloat16)),
        MemoryObj.from_kv(key(3), torch.randn(2, 1, 7, 3)),
        MemoryObj(key(4), torch.arange(1001, dtype=torch.int32).to(torch.uint8), (2, 3, 16, 64), torch.float16, "lz4"),
    ]
    assert out.send(address, objs, {"tier": "cpu"}, token=TOKEN) == {"num_tokens": 16 + 5 + 7 + 16}
    (got, meta), = receiver.calls
    assert meta == {"tier": "cpu"}
    for obj, (k, data, compressor) in zip(objs, got):
        assert k == obj.key and compressor == obj.compressor and torch.equal(data, obj.data)
    assert out.send(address, [], {}, token=TOKEN) == {"num_tokens": 0}


def test_a_wrong_token_is_refused_before_anything_is_allocated(pair):
    out, into, address, receiver = pair
    receiver.calls.clear()
    before = [id(item[0]) for item in into._free]
    big = [MemoryObj.from_kv(key(9), torch.zeros(2, 4, 256, 1024, dtype=torch.float16))]
    for token in ("wrong", None):
        with pytest.raises(TransferError, match="missing or wrong KVSTACKS_WORKER_TOKEN"):
            out.send(address, big, {}, token=token)
    assert receiver.calls == [] and [id(item[0]) for item in into._free] == before


def test_caps_and_refusals_come_back_as_clear_errors(pair):
    out, _, address, receiver = pair
    many = [MemoryObj.from_kv(key(i), torch.zeros(2, 1, 1, 4, dtype=torch.float16)) for i in range(65)]
    with pytest.raises(TransferError, match=r"transfer count must be 0\.\.64"):
        out.send(address, many, {}, token=TOKEN)
    receiver.fail = ValueError("tier cpu is full")
    try:
        with pytest.raises(TransferError, match="tier cpu is full"):
            out.send(address, many[:3], {}, token=TOKEN)
    finally:
        receiver.fail = None


def test_receive_buffers_are_reused(pair):
    out, into, address, _ = pair
    objs = [MemoryObj.from_kv(key(5), torch.ones(2, 2, 64, 256, dtype=torch.float16))]
    out.send(address, objs, {}, token=TOKEN)
    pooled = {item[0].data_ptr() for item in into._free}
    out.send(address, objs, {}, token=TOKEN)
    assert {item[0].data_ptr() for item in into._free} == pooled


def test_a_sender_that_vanishes_after_the_plan_is_a_failed_transfer(pair):
    from kvstacks_nixl import channel as nixl

    out, into, address, receiver = pair
    receiver.calls.clear()
    free = len(into._free)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(nixl._HEAD.pack(nixl.MAGIC, nixl.VERSION))
        nixl._send_msg(sock, json.dumps({"token": TOKEN}).encode())
        nixl._send_msg(sock, out._metadata())
        assert json.loads(nixl._recv_msg(sock, 1 << 20, "opening"))["ok"]
        nixl._recv_msg(sock, nixl.MAX_METADATA, "metadata")
        nbytes = 2 * 1 * 4 * 8 * 2
        head = {"count": 1, "total": 64 * -(-nbytes // 64), "ticket": "t", "meta": {}}
        nixl._send_msg(sock, json.dumps(head).encode())
        nixl._send_msg(sock, json.dumps([[key(7).to_string(), [2, 1, 4, 8], 1, "none", nbytes]]).encode())
        plan = json.loads(nixl._recv_msg(sock, 1 << 20, "plan"))
        assert plan["ok"] and plan["regions"][0][1] == nbytes
    # The receiver gives up on it, never hands half-written chunks on, and drops the buffer.
    deadline = threading.Event()
    deadline.wait(0.5)
    assert receiver.calls == [] and len(into._free) <= free and len(into._quarantine) == 1


def test_concurrent_senders(pair):
    out, _, address, receiver = pair
    receiver.calls.clear()
    errors = []

    def send(i: int) -> None:
        try:
            obj = MemoryObj.from_kv(key(20 + i), torch.full((2, 2, 32, 128), float(i), dtype=torch.float16))
            out.send(address, [obj], {"i": i}, token=TOKEN)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    got = {meta["i"]: objs[0][1] for objs, meta in receiver.calls}
    assert sorted(got) == list(range(6))
    assert all(bool((data == float(i)).all()) for i, data in got.items())


def test_a_sender_keeps_its_control_connection_open_for_the_next_transfers(pair):
    out, into, address, receiver = pair
    obj = MemoryObj.from_kv(key(30), torch.ones(2, 2, 16, 64, dtype=torch.float16))

    def idle() -> set:
        return {c.sock for conns in out._connections._idle.values() for c in conns}

    out.send(address, [obj], {}, token=TOKEN)
    kept = idle()
    for _ in range(3):
        out.send(address, [obj], {}, token=TOKEN)
    assert idle() == kept and len(into._serving) == len(kept)  # no new connection opened


def test_a_connection_the_receiver_closed_while_idle_is_replaced_unnoticed():
    require("nixl._api", "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1")
    from kvstacks_nixl import NixlChannel

    receiver = Receiver()
    into = NixlChannel(NixlChannel.Options(idle_timeout=0.3))
    address = into.listen("127.0.0.1", 0, receiver, TOKEN)
    out = NixlChannel()
    try:
        obj = MemoryObj.from_kv(key(31), torch.full((2, 1, 8, 64), 3.0, dtype=torch.float16))
        out.send(address, [obj], {}, token=TOKEN)
        threading.Event().wait(1.0)  # the receiver closes the idle connection after 0.3 s
        assert into._serving == set()
        assert out.send(address, [obj], {"again": True}, token=TOKEN) == {"num_tokens": 8}
        assert receiver.calls[-1][1] == {"again": True}
    finally:
        out.close()
        into.close()
