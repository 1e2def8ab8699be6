"""The tier's own logic without a store: YAML options, calls with deadlines, leased read slots."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from kvstacks.config import parse_stack
from kvstacks.errors import ConfigError
from kvstacks_mooncake.calls import Caller, CallTimeout
from kvstacks_mooncake.memory import Registrations, Slots


def tier(**options):
    return parse_stack({"stack": [{"backend": "cpu"}, {"backend": "mooncake", **options}]}).stack[1]


def test_yaml_options_are_read_with_sizes():
    t = tier(master="10.0.0.5:50051", segment_bytes="4GiB", replica_num=2, prefix="llama:", protocol="rdma",
             device="mlx5_0")
    o = t.backend_options
    assert (o.master, o.segment_bytes, o.replica_num, o.prefix, o.protocol) == (
        "10.0.0.5:50051", 4 << 30, 2, "llama:", "rdma")
    assert o.metadata_server == "P2PHANDSHAKE" and o.force_remove is True


@pytest.mark.parametrize(("options", "path", "says"), [
    ({"master": "localhost"}, "stack[1].master", "not host:port"),
    ({"master": "127.0.0.1:99999"}, "stack[1].master", "not host:port"),
    ({"protocol": "udp"}, "stack[1].protocol", "'tcp', 'rdma'"),
    ({"metadata_server": "zk://x"}, "stack[1].metadata_server", "P2PHANDSHAKE"),
    ({"segment_bytes": "1MiB"}, "stack[1].segment_bytes", "0 (lend none) or at least 16MiB"),
    ({"segment_bytes": "lots"}, "stack[1].segment_bytes", "cannot read 'lots' as a size"),
    ({"replica_num": 0}, "stack[1].replica_num", "at least 1"),
    ({"timeout": -1}, "stack[1].timeout", "positive number of seconds"),
    ({"prefix": ""}, "stack[1].prefix", "must not be empty"),
    ({"local_hostname": "127.0.0.1:5"}, "stack[1].local_hostname", "no port"),
    ({"masters": "a:1"}, "stack[1].masters", "unknown option"),
])
def test_bad_options_name_their_yaml_path(options, path, says):
    with pytest.raises(ConfigError) as info:
        tier(**options)
    assert info.value.path == path and says in info.value.message, str(info.value)


async def test_a_call_past_its_deadline_fails_and_its_thread_is_replaced():
    caller = Caller(2)
    gate = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            await caller.call(0.2, gate.wait)  # a call that hangs
        assert time.monotonic() - started < 1.0
        with pytest.raises(CallTimeout):
            await caller.call(0.2, gate.wait)
        # both original threads are stuck: replacements serve new calls at once
        assert await caller.call(1.0, lambda x: x + 1, 41) == 42
        assert caller.abandoned == 2
        with pytest.raises(ZeroDivisionError):  # errors reach the caller as they are
            await caller.call(1.0, lambda: 1 / 0)
    finally:
        gate.set()
        caller.stop()


async def test_calls_run_concurrently_on_the_threads():
    caller = Caller(3)
    barrier = threading.Barrier(3, timeout=5)
    try:
        results = await asyncio.gather(*(caller.call(5.0, barrier.wait) for _ in range(3)))
        assert sorted(results) == [0, 1, 2]
    finally:
        caller.stop()


class FakeRegistry:
    """Counts what would be registered with the store."""

    def __init__(self) -> None:
        self.regions: dict[int, int] = {}

    def register(self, ptr: int, size: int) -> int:
        assert ptr not in self.regions, "registered twice"
        self.regions[ptr] = size
        return 0

    def unregister(self, ptr: int) -> int:
        del self.regions[ptr]
        return 0


def test_slots_are_reused_and_forgotten_leases_taken_back():
    reg = FakeRegistry()
    slots = Slots(64 << 10, reg.register, reg.unregister)
    a = slots.take(10_000)
    assert a.size == 12288 and reg.regions == {a.base: 12288}
    slots.give_back(a)
    assert slots.take(9000) is a  # same size class: reused, not registered again
    a.handed_out = True
    view = a.tensor[:100].view(torch.float16)  # the engine still reads it: never taken back
    others = [slots.take(12288) for _ in range(4)]
    assert a not in others
    for o in others:
        o.handed_out = True
    del view, others  # leases never released, nothing references them: taken back when room is needed
    b = slots.take(12288)
    assert slots.reclaimed >= 1 and b.base in reg.regions
    slots.close()
    assert reg.regions == {}


def test_registrations_keep_engine_buffers_registered_within_a_budget():
    reg = FakeRegistry()
    regs = Registrations(3 << 20, reg.register, reg.unregister)
    buffers = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(4)]
    held = regs.acquire([buffers[0][:100], buffers[0][500:]])  # one storage, one registration
    assert len(reg.regions) == 1 and regs.registered == 1
    regs.release(held)
    regs.release(regs.acquire([buffers[0]]))
    assert regs.registered == 1  # still registered: the second write from it costs nothing
    for b in buffers[1:]:
        regs.release(regs.acquire([b]))
    assert regs.bytes <= 3 << 20 and len(reg.regions) == 3  # least recently used went first
    assert buffers[0].data_ptr() not in reg.regions
    regs.close()
    assert reg.regions == {}


def test_overlap_runs_stages_in_order_and_overlaps_them():
    from kvstacks_mooncake.calls import overlap, split

    assert [list(r) for r in split(10, 4)] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [list(r) for r in split(2, 4)] == [[0], [1]]
    events: list[str] = []
    second_running = threading.Event()

    def first(g: int) -> None:
        if g == 1:  # the second stage of group 0 runs while this one does
            assert second_running.wait(5)
        events.append(f"first {g}")

    def second(g: int) -> None:
        if g == 0:
            second_running.set()
            time.sleep(0.05)
        events.append(f"second {g}")

    overlap(3, first, second)
    assert events.index("first 0") < events.index("second 0") < events.index("second 1") < events.index("second 2")
    assert events.index("first 1") < events.index("second 1")

    def failing(g: int) -> None:
        raise ValueError(f"group {g}")

    with pytest.raises(ValueError, match="group 0"):
        overlap(2, lambda g: None, failing)
