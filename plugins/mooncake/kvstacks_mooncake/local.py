"""Reading replicas that lie in this process's own segment, checked while the bytes are in cache.

Within one process Mooncake's get is one memcpy from the segment into the reader's buffer; the
frame's checksum is then one more pass over the same bytes, from memory. Here the tier copies
a replica of its own segment itself, in blocks the size of a core's cache, and hashes each block
right after copying it: one pass over memory instead of two. The check is the frame's own, over
every byte, so a replica removed, re-placed or torn while it is copied is still a miss.

Mooncake says where a replica lies (``get_replica_desc``: endpoint and address). The address is
only read when the replica is in this process's segment: its endpoint is this client's, and the
whole object lies in the memory the segment was found in at start (a probe object written there
and read back). Anything else goes through ``batch_get_into``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from kvstacks import frame

log = logging.getLogger("kvstacks.mooncake")

#: bytes copied and hashed at a time: the copy's source and destination stay in a core's L2
BLOCK = 256 << 10
PROBE_BYTES = 4096
#: places remembered (name -> address, size); the oldest is forgotten first
MAX_PLACES = 1 << 16


def _mapping(addr: int, size: int) -> tuple[int, int] | None:
    """The readable and writable memory of this process around ``[addr, addr + size)``: the
    mapping that holds it and the rw mappings right next to it (one allocation can be several
    mappings, e.g. after the kernel split it to back part of it with huge pages)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi, fields[1].startswith("rw")))
    at = next((i for i, (lo, hi, _) in enumerate(spans) if lo <= addr and addr + size <= hi), None)
    if at is None or not spans[at][2]:
        return None
    first = last = at
    while first > 0 and spans[first - 1][2] and spans[first - 1][1] == spans[first][0]:
        first -= 1
    while last + 1 < len(spans) and spans[last + 1][2] and spans[last + 1][0] == spans[last][1]:
        last += 1
    return spans[first][0], spans[last][1]


def _copy_hashing(src: int, runs: list[tuple[int, np.ndarray]], check: frame.RunningCheck) -> int:
    """Copy consecutive bytes from ``src`` into ``runs`` (``(address, array)``, in order) block by
    block, feeding each block to ``check`` right after its copy (still in cache); return the end."""
    for dst, view in runs:
        for off in range(0, len(view), BLOCK):
            n = min(BLOCK, len(view) - off)
            ctypes.memmove(dst + off, src, n)
            check.update(view[off : off + n])
            src += n
    return src


class LocalSegment:
    """Where this client's segment lies; reads replicas in it with the check done block by block."""

    def __init__(self, endpoint: str, lo: int, hi: int) -> None:
        self.endpoint = endpoint
        self.lo, self.hi = lo, hi
        self._lock = threading.Condition()
        self._reading = 0
        self._closed = False
        # Where objects of this segment lay when last asked (after this tier's own puts, or a read).
        # Read without asking the master again: no lease is held, so the region may since have been
        # freed and reused; the frame check (key in its header, xxh3 over every byte) then fails and
        # the caller re-reads through the client. Never wrong data, at worst one wasted copy.
        self._places: OrderedDict[str, tuple[int, int]] = OrderedDict()

    @classmethod
    def find(cls, store: Any, slot_base: int, slot_view: np.ndarray, segment_bytes: int) -> LocalSegment | None:
        """Write a probe object to this client's own segment and find it in this process's memory."""
        from mooncake.store import ReplicateConfig

        probe = os.urandom(PROBE_BYTES)
        slot_view[:PROBE_BYTES] = np.frombuffer(probe, np.uint8)
        config = ReplicateConfig()
        config.replica_num = 1
        config.preferred_segment = store.get_hostname()
        key = f"kvstacks-probe-{uuid.uuid4().hex}"
        if store.put_from(key, slot_base, PROBE_BYTES, config) != 0:
            return None
        try:
            for replica in store.get_replica_desc(key):
                if not replica.is_memory_replica():
                    continue
                desc = replica.get_memory_descriptor().buffer_descriptor
                where = _mapping(desc.buffer_address, PROBE_BYTES)
                if where is None or ctypes.string_at(desc.buffer_address, PROBE_BYTES) != probe:
                    continue
                # the segment is one allocation of segment_bytes around the probe
                lo = max(where[0], desc.buffer_address - segment_bytes)
                hi = min(where[1], desc.buffer_address + segment_bytes)
                return cls(desc.transport_endpoint, lo, hi)
            return None
        finally:
            store.batch_remove([key], True)

    def address(self, replicas: list[Any]) -> tuple[int, int] | None:
        """``(address, size)`` of a complete replica in this segment, if the object has one."""
        for replica in replicas:
            if not replica.is_memory_replica() or replica.status.name != "COMPLETE":
                continue
            desc = replica.get_memory_descriptor().buffer_descriptor
            addr, size = desc.buffer_address, desc.size
            if desc.transport_endpoint == self.endpoint and self.lo <= addr and addr + size <= self.hi:
                return addr, size
        return None

    def remember(self, name: str, place: tuple[int, int]) -> None:
        with self._lock:
            places = self._places
            places[name] = place
            places.move_to_end(name)
            if len(places) > MAX_PLACES:
                places.popitem(last=False)

    def place(self, name: str) -> tuple[int, int] | None:
        """Where ``name`` lay in this segment when last asked, or None."""
        return self._places.get(name)

    def forget(self, names: list[str] | None = None) -> None:
        """Forget where ``names`` lie (all if None): removed, overwritten, or found stale."""
        with self._lock:
            if names is None:
                self._places.clear()
            else:
                for name in names:
                    self._places.pop(name, None)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def places(self) -> int:
        return len(self._places)

    def read(self, addr: int, size: int, dst: int, dst_view: np.ndarray) -> frame.RunningCheck | None:
        """Copy ``size`` bytes from the segment to ``dst``, hashing each block right after its copy.

        None if the segment is being closed (its memory may go)."""
        with self._lock:
            if self._closed:
                return None
            self._reading += 1
        try:
            check = frame.RunningCheck(size)
            _copy_hashing(addr, [(dst, dst_view[:size])], check)
            return check
        finally:
            with self._lock:
                self._reading -= 1
                self._lock.notify_all()

    def read_into(self, addr: int, size: int, head: bytes, runs: list[tuple[int, np.ndarray]]) -> bool | None:
        """Copy a frame whose header should be ``head`` from the segment, its payload straight into
        ``runs`` (``(address, view)`` of each, in order), hashing each block right after its copy.

        True if the frame is exactly that header, a payload of the runs' size and a valid check;
        False if not (freed and reused, torn, or another layout: the runs may have been written);
        None if the segment is being closed."""
        if size != len(head) + sum(len(view) for _, view in runs) + frame.CHECK_BYTES:
            return False
        with self._lock:
            if self._closed:
                return None
            self._reading += 1
        try:
            if ctypes.string_at(addr, len(head)) != head:
                return False
            check = frame.RunningCheck(size)
            check.update(head)
            end = _copy_hashing(addr + len(head), runs, check)
            return frame.check_matches(check, ctypes.string_at(end, frame.CHECK_BYTES))
        finally:
            with self._lock:
                self._reading -= 1
                self._lock.notify_all()

    def close(self, timeout: float) -> None:
        """No new reads; wait for those under way (the segment's memory goes with the client)."""
        with self._lock:
            self._closed = True
            self._places.clear()
            self._lock.wait_for(lambda: self._reading == 0, timeout)
