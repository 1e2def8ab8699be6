"""Memory registered with the store, so chunks move without a copy in Python.

Mooncake's zero-copy calls read from and write into registered memory only
(RDMA needs it; TCP checks it too). Two kinds:

- ``Slots``: buffers this tier owns and reads chunks into. A chunk fetched by
  ``batch_get`` is a view of its slot, leased to the engine until it releases
  it (``release_now``). A slot whose lease is never released is taken back once
  nothing references its memory any more.
- ``Registrations``: the engine's own buffers (the CPU tier's pool, the
  caller's KV) registered where they are, the first time a chunk is written
  from them, and kept registered (and alive) up to a byte budget, least
  recently used first out.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

PAGE = 4096

Register = Callable[[int, int], int]
Unregister = Callable[[int], int]


class RegistrationFailed(RuntimeError):
    pass


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class Slot:
    __slots__ = ("base", "handed_out", "idle_refs", "idle_uses", "size", "tensor")

    def __init__(self, size: int) -> None:
        self.size = size
        self.tensor = torch.empty(size, dtype=torch.uint8)
        self.base = self.tensor.data_ptr()
        self.handed_out = False  # its bytes were given to the engine (only then can a lease be forgotten)
        # references when nobody outside holds a view: torch views share the storage,
        # numpy views (and buffers made from them) hold the tensor itself
        self.idle_uses = _use_count(self.tensor)
        self.idle_refs = sys.getrefcount(self.tensor)

    def unreferenced(self) -> bool:
        return _use_count(self.tensor) <= self.idle_uses and sys.getrefcount(self.tensor) <= self.idle_refs


class Slots:
    """Registered read buffers by size class (whole pages), reused through free lists."""

    def __init__(self, budget: int, register: Register, unregister: Unregister) -> None:
        self.budget = budget
        self._register = register
        self._unregister = unregister
        self._free: dict[int, list[Slot]] = {}
        self._leased: dict[int, Slot] = {}  # slot base address -> slot
        self._lock = threading.Lock()
        self.bytes = 0  # registered in slots, free or leased
        self.reclaimed = 0  # leases never released, taken back when unreferenced

    def take(self, nbytes: int) -> Slot:
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        with self._lock:
            free = self._free.get(size)
            if free:
                slot = free.pop()
                slot.handed_out = False
                self._leased[slot.base] = slot
                return slot
            if self.bytes + size > self.budget:
                self._make_room(size)
        slot = Slot(size)
        if self._register(slot.base, size) != 0:
            raise RegistrationFailed(f"the store refused to register a {size}-byte read buffer")
        with self._lock:
            self.bytes += size
            self._leased[slot.base] = slot
        return slot

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            if self._leased.pop(slot.base, None) is None:
                return
            if self.bytes > self.budget:
                self._drop(slot)
            else:
                self._free.setdefault(slot.size, []).append(slot)

    def release_view(self, tensor: torch.Tensor) -> None:
        """End the lease of the slot ``tensor`` lies in (a no-op for memory not from a slot)."""
        ptr = tensor.data_ptr()
        with self._lock:
            slot = next((s for base, s in self._leased.items() if base <= ptr < base + s.size), None)
        if slot is not None:
            self.give_back(slot)

    def _make_room(self, size: int) -> None:
        """Under the lock: reclaim forgotten leases, then drop free slots of other sizes."""
        for base, slot in list(self._leased.items()):
            if slot.handed_out and slot.unreferenced():
                del self._leased[base]
                self.reclaimed += 1
                self._free.setdefault(slot.size, []).append(slot)
        for free in self._free.values():
            while free and self.bytes + size > self.budget:
                self._drop(free.pop())
        # Past the budget only when every slot is leased and in use: reads then still work.

    def _drop(self, slot: Slot) -> None:
        self._unregister(slot.base)
        self.bytes -= slot.size

    def close(self) -> None:
        """Unregister every slot; leased ones stay readable (reading needs no registration)."""
        with self._lock:
            for free in self._free.values():
                for slot in free:
                    self._drop(slot)
            self._free.clear()
            for slot in self._leased.values():
                self._drop(slot)
            self._leased.clear()


class Registrations:
    """The engine's buffers registered in place, kept alive while registered, LRU within a budget."""

    def __init__(self, budget: int, register: Register, unregister: Unregister) -> None:
        self.budget = budget
        self._register = register
        self._unregister = unregister
        self._regions: OrderedDict[int, tuple[int, torch.UntypedStorage]] = OrderedDict()
        self._in_use: dict[int, int] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.registered = 0  # registrations made, for stats
        self.refused = 0  # registrations the store refused (e.g. memory the application registered itself)

    def acquire(self, tensors: list[torch.Tensor]) -> list[int]:
        """Make sure each tensor's memory is registered; return the regions to ``release``."""
        held = []
        with self._lock:
            for tensor in tensors:
                storage = tensor.untyped_storage()
                base, size = storage.data_ptr(), storage.nbytes()
                known = self._regions.get(base)
                if known is None or known[0] < size:
                    if known is not None:
                        self._forget(base)
                    if self._register(base, size) != 0:
                        # registered already by someone else (the application), or not registrable: the
                        # transfer says so if it needed it
                        self.refused += 1
                        continue
                    self._regions[base] = (size, storage)
                    self.bytes += size
                    self.registered += 1
                else:
                    self._regions.move_to_end(base)
                self._in_use[base] = self._in_use.get(base, 0) + 1
                held.append(base)
            self._trim()
        return held

    def release(self, held: list[int]) -> None:
        with self._lock:
            for base in held:
                self._in_use[base] -= 1
                if not self._in_use[base]:
                    del self._in_use[base]
            self._trim()

    def _trim(self) -> None:
        for base in list(self._regions):
            if self.bytes <= self.budget:
                return
            if base not in self._in_use:
                self._forget(base)

    def _forget(self, base: int) -> None:
        size, _ = self._regions.pop(base)
        self._unregister(base)
        self.bytes -= size

    def close(self) -> None:
        with self._lock:
            for base in list(self._regions):
                self._forget(base)
            self._in_use.clear()
