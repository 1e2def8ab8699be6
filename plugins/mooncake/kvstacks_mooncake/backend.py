"""The ``mooncake`` backend: chunks as Mooncake objects, one kvstacks frame per key, moved zero-copy."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch
from kvstacks import frame
from kvstacks.backend import Backend
from kvstacks.errors import CorruptChunk, InvalidInput, TierFull
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj, run_offsets, run_views

from kvstacks_mooncake import client as mc
from kvstacks_mooncake.calls import Caller, CallTimeout, overlap, split
from kvstacks_mooncake.local import PROBE_BYTES, LocalSegment
from kvstacks_mooncake.memory import Registrations, Slot, Slots
from kvstacks_mooncake.options import MooncakeOptions

log = logging.getLogger("kvstacks.mooncake")
T = TypeVar("T")

#: size hints kept for keys this process wrote or read (a read needs a buffer of the right size)
MAX_HINTS = 1 << 20
CHECK_BYTES = frame.CHECK_BYTES
#: extra attempts for puts that failed in transfer (placed on a dead process's segment)
PUT_RETRIES = 2
#: a remembered read of at least this many bytes is shared with a helper thread
SPLIT_BYTES = 4 << 20


class MooncakeBackend(Backend):
    """A tier on a Mooncake Store: every process with the same master and prefix shares it."""

    name = "mooncake"
    shared = True
    Options = MooncakeOptions

    def __init__(self, options: MooncakeOptions | None = None) -> None:
        super().__init__(options)
        o: MooncakeOptions = self.options
        self.prefix = o.prefix
        self.breaker = mc.MooncakeBreaker(o.breaker_failures, o.breaker_backoff, o.breaker_backoff_max)
        self.caller: Caller | None = None
        self.store: Any = None
        self.slots: Slots | None = None
        self.registrations: Registrations | None = None
        self.local: LocalSegment | None = None  # this client's own segment, read directly
        self._config: Any = None
        self._connecting = threading.Lock()  # one connect attempt at a time
        self._closed = False
        self._sizes: dict[str, int] = {}  # frame size by name: written or read by this process
        self._guess = 1 << 20  # buffer size for a key of unknown size; a short one costs one more call
        self.transfer_failures = 0
        self.local_hits = 0  # chunks read from a remembered place in this process's segment
        self.placed = 0  # of those, read straight into the caller's memory (batch_get_into)
        self.local_stale = 0  # remembered places that no longer held the chunk (re-read through the client)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; a master that is not there opens the breaker instead of raising."""
        self.caller = Caller(self.options.threads)
        try:
            await self.caller.call(self.options.connect_timeout, self._connect)
        except ImportError:
            raise
        except (mc.MooncakeUnavailable, CallTimeout) as exc:
            self.breaker.trip(str(exc))
            log.warning("mooncake tier (master %s) is unreachable at start (%s); the tier misses until it answers",
                        self.options.master, exc)

    def _connect(self) -> None:
        """Blocking: set up a client unless one is there. Runs in a call thread; may outlive its deadline."""
        with self._connecting:
            if self.store is not None or self._closed:
                return
            store = mc.take_client(self.options)
            config = mc.replicate_config(self.options)
            slots = Slots(self.options.read_buffer_bytes, store.register_buffer, store.unregister_buffer)
            registrations = Registrations(self.options.register_bytes, store.register_buffer, store.unregister_buffer)
            if self._closed:  # closed while this was connecting: nobody will use it
                mc.keep_client(self.options, store)
                return
            self.local = self._find_local(store, slots)
            self._config, self.slots, self.registrations = config, slots, registrations
            self.store = store
            log.info("mooncake tier connected to master %s", self.options.master)

    def _find_local(self, store: Any, slots: Slots) -> LocalSegment | None:
        if not self.options.segment_bytes:
            return None
        slot = slots.take(PROBE_BYTES)
        try:
            return LocalSegment.find(store, slot.base, slot.tensor.numpy(), int(self.options.segment_bytes))
        except Exception as exc:  # reads then all go through batch_get_into
            log.warning("mooncake tier: could not locate this process's segment (%s); reading through the client", exc)
            return None
        finally:
            slots.give_back(slot)

    async def close(self) -> None:
        """Unregister and close the client; bounded by ``close_timeout`` even if the store hangs."""
        if self._closed:
            return
        self._closed = True
        caller, store = self.caller, self.store
        self.store = None
        if caller is None:
            return
        if store is not None:
            try:
                await caller.call(self.options.close_timeout, self._shutdown, store)
            except Exception as exc:  # closing is best effort: never keep the engine from shutting down
                log.warning("mooncake tier did not close cleanly: %s", exc)
        caller.stop()

    def _shutdown(self, store: Any) -> None:
        if self.local is not None:
            self.local.close(self.options.close_timeout)
        if self.registrations is not None:
            self.registrations.close()
        if self.slots is not None:
            self.slots.close()
        if self.options.keep_client:
            mc.keep_client(self.options, store)
        else:
            store.close()

    # -- the guard every call goes through ------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(store, *args)`` in a call thread, through the breaker, within ``timeout``."""
        if self._closed or self.caller is None:
            raise mc.MooncakeUnavailable(f"mooncake tier is {'closed' if self._closed else 'not started'}")
        self.breaker.check()
        settled = False
        try:
            if self.store is None:  # down at start, or not yet back: this call is the probe
                await self.caller.call(self.options.connect_timeout, self._connect)
            store = self.store
            if store is None:
                raise mc.MooncakeUnavailable("closed while connecting")
            result = await self.caller.call(self.options.timeout, fn, store, *args)
            settled = True
            self.breaker.success()
            return result
        except (mc.MooncakeUnavailable, CallTimeout) as exc:
            settled = True
            self.breaker.failure(str(exc))
            raise mc.MooncakeUnavailable(f"mooncake {what} failed (master {self.options.master}): {exc}") from None
        except BaseException:
            settled = True
            self.breaker.success()  # the store answered (with a refusal): it is up
            raise
        finally:
            if not settled:
                self.breaker.abandon()

    def _name(self, key: CacheKey) -> str:
        return self.prefix + key.to_string()

    def _hint(self, name: str, size: int) -> None:
        sizes = self._sizes
        if name not in sizes and len(sizes) >= MAX_HINTS:
            sizes.pop(next(iter(sizes)))
        sizes[name] = size
        self._guess = size

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        await self.batch_put([(key, obj)])

    async def batch_put(self, items: Iterable[tuple[CacheKey, MemoryObj]]) -> None:
        names, objs = [], []
        for key, obj in items:
            if obj.key != key:
                raise InvalidInput(f"object holds key {obj.key} but is stored under {key}")
            if run_offsets(obj.data) is None:
                # a view whose contiguous runs are short: one gathering copy beats many tiny buffers
                obj = MemoryObj(obj.key, obj.data.contiguous(), obj.shape, obj.dtype, obj.compressor, obj.check)
            names.append(self._name(key))
            objs.append(obj)
        if not names:
            return
        # Mooncake's put keeps an existing value: a key this process wrote before is removed first,
        # so its own writes overwrite. A key another process wrote holds the same tokens' KV: kept.
        rewrite = [n for n in names if n in self._sizes]
        if rewrite:
            await self._call("put", self._remove_blocking, rewrite)
        codes = await self._call("put", self._put_blocking, names, objs)
        refused = [(n, c) for n, c in zip(names, codes) if c not in (0, mc.ALREADY_EXISTS)]
        if not refused:
            return
        if all(c == mc.NO_SPACE for _, c in refused):
            raise TierFull(f"the Mooncake store has no room for {len(refused)} chunk(s): every segment is full; "
                           "add segments (segment_bytes, or more processes), or lower the master's eviction watermark")
        if any(c in mc.UNREACHABLE for _, c in refused):
            self.breaker.failure(f"put returned {refused[0][1]}")
            raise mc.MooncakeUnavailable(f"mooncake put failed (master {self.options.master}): code {refused[0][1]}")
        raise mc.MooncakeError(f"mooncake put refused {len(refused)} of {len(names)} chunk(s), e.g. {refused[0][0]!r} "
                               f"with code {refused[0][1]}")

    def _put_blocking(self, store: Any, names: list[str], objs: list[MemoryObj]) -> list[int]:
        """Frame ends (header, checksum) go in one small slot, payloads are sent from where they are
        (a chunk sliced out of a longer KV as its contiguous runs, without a copy);
        the checksums of one part of the batch are computed while the part before it is sent."""
        assert self.slots is not None and self.registrations is not None
        heads = [frame.header(obj) for obj in objs]
        slot = self.slots.take(sum(len(h) + CHECK_BYTES for h in heads))
        held = self.registrations.acquire([obj.data for obj in objs if obj.nbytes])
        view = slot.tensor.numpy()
        # each payload's contiguous runs, found once: sent from where they lie, hashed in order
        # (batch_put gathered views of short runs already; with min_run 1 there is always an answer)
        payloads = [run_views(obj.data, min_run=1) or [] if obj.nbytes else [] for obj in objs]
        ptrs: list[list[int]] = []
        sizes: list[list[int]] = []
        offset = 0
        for head, runs in zip(heads, payloads):
            n = len(head)
            view[offset : offset + n] = np.frombuffer(head, np.uint8)
            item_ptrs, item_sizes = [slot.base + offset], [n]
            item_ptrs.extend(address for address, _ in runs)
            item_sizes.extend(len(run) for _, run in runs)
            item_ptrs.append(slot.base + offset + n)
            item_sizes.append(CHECK_BYTES)
            ptrs.append(item_ptrs)
            sizes.append(item_sizes)
            offset += n + CHECK_BYTES
        groups = split(len(names), self.options.pipeline_parts)
        codes = [0] * len(names)

        def checksum(g: int) -> None:
            for i in groups[g]:
                # a check the object carries (computed as the cpu tier copied it in) saves a pass
                check = frame.check_field(objs[i], heads[i], *(run for _, run in payloads[i]))
                end = ptrs[i][-1] - slot.base
                view[end : end + CHECK_BYTES] = np.frombuffer(check, np.uint8)

        def send(g: int) -> None:
            part = groups[g]
            got = store.batch_put_from_multi_buffers([names[i] for i in part], [ptrs[i] for i in part],
                                                     [sizes[i] for i in part], self._config)
            for i, code in zip(part, got):
                codes[i] = code

        try:
            overlap(len(groups), checksum, send)
            # A segment whose process died stays listed for the master's client_ttl and puts placed
            # there fail; the master places a retried put anew.
            for _ in range(PUT_RETRIES):
                again = [i for i, c in enumerate(codes) if c == mc.TRANSFER_FAIL]
                if not again:
                    break
                retried = store.batch_put_from_multi_buffers([names[i] for i in again], [ptrs[i] for i in again],
                                                             [sizes[i] for i in again], self._config)
                for i, code in zip(again, retried):
                    codes[i] = code
        finally:
            self.registrations.release(held)
            self.slots.give_back(slot)
        for name, code, item_sizes in zip(names, codes, sizes):
            if code == 0:
                self._hint(name, sum(item_sizes))
        if self.local is not None:
            self._learn_places(store, [n for n, c in zip(names, codes) if c == 0])
        return codes

    def _learn_places(self, store: Any, names: list[str]) -> None:
        """Remember where the chunks just written lie if they landed in this process's segment:
        one descriptor RPC per batch here saves one on every later read of them."""
        local = self.local
        if not names or local is None:
            return
        try:
            replicas = store.batch_get_replica_desc(names)
        except Exception as exc:  # reads then ask where the chunks are
            log.debug("mooncake tier: batch_get_replica_desc failed: %s", exc)
            return
        for name in names:
            found = local.address(replicas.get(name, ()))
            if found is not None:
                local.remember(name, found)

    def _remove_blocking(self, store: Any, names: list[str]) -> list[int]:
        if self.local is not None:
            self.local.forget(names)
        codes = store.batch_remove(names, self.options.force_remove)
        if any(c in mc.UNREACHABLE for c in codes):
            raise mc.MooncakeUnavailable(f"remove returned {codes[0]}")
        for name in names:
            self._sizes.pop(name, None)
        return codes

    async def remove(self, key: CacheKey) -> bool:
        (code,) = await self._call("remove", self._remove_blocking, [self._name(key)])
        if code == mc.HAS_LEASE:
            log.warning("mooncake tier: %s was read in the last lease period and force_remove is off; not removed", key)
        return code == 0

    async def clear(self) -> None:
        """Remove every key under this tier's prefix (what any process with this prefix wrote)."""
        pattern = "^" + re.escape(self.prefix)
        code = await self._call("clear", lambda store: store.remove_by_regex(pattern, self.options.force_remove))
        if code < 0:
            raise mc.MooncakeError(f"mooncake clear failed with code {code}")
        self._sizes.clear()
        if self.local is not None:
            self.local.forget()

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, key: CacheKey) -> MemoryObj | None:
        return (await self.batch_get([key]))[0]

    async def batch_get(self, keys: list[CacheKey]) -> list[MemoryObj | None]:
        return await self._batch_get(keys, None)

    async def batch_get_into(self, keys: list[CacheKey], places: list[torch.Tensor]) -> list[MemoryObj | None]:
        """``batch_get``; a chunk whose place in this process's segment is remembered is copied and
        checked straight into the caller's place (no read slot, no copy by the engine after)."""
        return await self._batch_get(keys, places)

    async def _batch_get(self, keys: list[CacheKey], places: list[torch.Tensor] | None) -> list[MemoryObj | None]:
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        out: list[MemoryObj | None] = [None] * len(keys)
        rest = list(range(len(keys)))
        local = self.local
        if local is not None and not self._closed and self.store is not None and local.places:
            self.breaker.check()  # an open breaker fails every call, as it did before places were remembered
            # No call to the master, so no deadline to keep: the copy runs right here. Handing it
            # to a call thread measured ~1 ms a batch (8 x 8 MiB: 82% of raw against 89% here).
            rest = self._read_remembered(keys, names, out, places)
        if not rest:
            return out
        try:
            found = await self._call("get", self._get_blocking, [keys[i] for i in rest], [names[i] for i in rest])
        except BaseException:
            for obj in out:
                if obj is not None:
                    self.release_now(obj)
            raise
        corrupt = [names[i] for i, (_, bad) in zip(rest, found) if bad]
        for i, (obj, _) in zip(rest, found):
            out[i] = obj
        if corrupt:
            try:
                await self._call("remove", self._remove_blocking, corrupt)
            except Exception as exc:  # the miss stands either way
                log.warning("mooncake tier: could not remove corrupt chunks: %s", exc)
        return out

    def _read_remembered(self, keys: list[CacheKey], names: list[str], out: list[MemoryObj | None],
                         places: list[torch.Tensor] | None = None) -> list[int]:
        """Chunks whose place in this process's segment is remembered: copied and checked block by
        block, with no call to the master, into the caller's ``places`` when given and the chunk's
        frame fits one (uncompressed, that shape and dtype), else into a read slot. Returns the
        indices still to read through the client (not remembered, or the place no longer holds
        the chunk: freed and reused, or torn)."""
        local = self.local
        assert local is not None and self.slots is not None
        rest: list[int] = []
        todo: list[tuple[int, tuple[int, int], Slot | None, tuple[MemoryObj, bytes, list] | None]] = []
        for i, name in enumerate(names):
            where = local.place(name)
            if where is None:
                rest.append(i)
                continue
            into = None
            runs = run_views(places[i]) if places is not None and places[i].device.type == "cpu" else None
            if runs is not None:
                placed = MemoryObj(keys[i], places[i], tuple(places[i].shape), places[i].dtype)
                head = frame.header(placed)
                if where[1] == len(head) + placed.nbytes + CHECK_BYTES:
                    into = (placed, head, runs)
            todo.append((i, where, None if into else self.slots.take(where[1]), into))
        if not todo:
            return rest
        got: dict[int, MemoryObj | None] = {}

        def read(jobs: list[tuple[int, tuple[int, int], Slot | None, tuple[MemoryObj, bytes, list] | None]]) -> None:
            for i, (addr, size), slot, into in jobs:
                if into is not None:
                    placed, head, runs = into
                    got[i] = placed if local.read_into(addr, size, head, runs) else None
                    continue
                assert slot is not None
                check = local.read(addr, size, slot.base, slot.tensor.numpy())
                obj = None
                if check is not None:
                    try:
                        obj = frame.decode(memoryview(slot.tensor.numpy())[:size], expect_key=keys[i], running=check)
                    except CorruptChunk as exc:
                        # not evidence against the object: it may simply live elsewhere now
                        log.debug("mooncake tier: remembered place of %s is stale (%s); reading through the client",
                                  keys[i], exc)
                got[i] = obj

        # Copying and hashing in blocks is bound by one core (~80% of memcpy here); the second
        # core takes half the bytes (the GIL is released in memmove and xxh3).
        total = sum(where[1] for _, where, _, _ in todo)
        cut = len(todo)
        if len(todo) > 1 and total >= SPLIT_BYTES:
            half, acc, cut = total / 2, 0, 0
            while cut < len(todo) - 1 and acc + todo[cut][1][1] / 2 <= half:
                acc += todo[cut][1][1]
                cut += 1
        helper = threading.Thread(target=read, args=(todo[cut:],), daemon=True) if cut < len(todo) else None
        if helper is not None:
            helper.start()
        try:
            read(todo[:cut])
        finally:
            if helper is not None:
                helper.join()
        for i, _, slot, _ in todo:
            obj = got.get(i)
            if obj is None:
                if slot is not None:
                    self.slots.give_back(slot)
                if not local.closed:
                    self.local_stale += 1
                    local.forget([names[i]])
                rest.append(i)
                continue
            if slot is not None:
                slot.handed_out = True
            else:
                self.placed += 1
            out[i] = obj
            self.local_hits += 1
        rest.sort()
        return rest

    def _get_blocking(self, store: Any, keys: list[CacheKey], names: list[str]) -> list[tuple[MemoryObj | None, bool]]:
        """batch_get_into leased slots, part by part; one part is verified while the next arrives.

        Returns ``(object or None, corrupt)`` per key; a slot too short for its object is retried at its size.
        """
        assert self.slots is not None
        slots: list[Slot | None] = [self.slots.take(self._sizes.get(name, self._guess)) for name in names]
        lengths = [0] * len(names)
        out: list[tuple[MemoryObj | None, bool]] = [(None, False)] * len(names)
        done = self._read_local(store, keys, names, slots, out) if self.local is not None else set()
        remote = [i for i in range(len(names)) if i not in done]
        groups = [[remote[j] for j in run] for run in split(len(remote), self.options.pipeline_parts)] if remote else []

        def fetch(g: int) -> None:
            part = groups[g]
            codes = store.batch_get_into([names[i] for i in part], [slots[i].base for i in part],
                                         [slots[i].size for i in part])
            if g == 0 and codes and all(c in mc.UNREACHABLE for c in codes):
                raise mc.MooncakeUnavailable(f"get returned {codes[0]}")
            for i, code in zip(part, codes):
                if code == mc.BUFFER_TOO_SMALL:
                    size = store.get_size(names[i])
                    if size > 0:
                        self.slots.give_back(slots[i])
                        slots[i] = self.slots.take(size)
                        code = store.get_into(names[i], slots[i].base, slots[i].size)
                if code > 0:
                    self._hint(names[i], code)
                    lengths[i] = code
                    continue
                if code not in (mc.NOT_FOUND, mc.BUFFER_TOO_SMALL):
                    # a replica on a dead process's segment (-800), or one the master just dropped: a miss
                    self.transfer_failures += 1
                    log.warning("mooncake tier: reading %r failed with code %d; treated as a miss", names[i], code)
                self._sizes.pop(names[i], None)

        def verify(g: int) -> None:
            for i in groups[g]:
                if lengths[i]:
                    out[i] = self._decode(keys[i], slots[i], lengths[i])
                    if out[i][0] is not None:
                        slots[i] = None  # leased to the engine now

        try:
            overlap(len(groups), fetch, verify)
        finally:
            for slot in slots:
                if slot is not None:
                    self.slots.give_back(slot)
        return out

    def _read_local(self, store: Any, keys: list[CacheKey], names: list[str], slots: list[Slot | None],
                    out: list[tuple[MemoryObj | None, bool]]) -> set[int]:
        """Chunks with a replica in this process's segment: copied and checked block by block.
        Returns the indices read (hit or corrupt); the others go through batch_get_into."""
        local = self.local
        assert local is not None and self.slots is not None
        try:
            replicas = store.batch_get_replica_desc(names)
        except Exception as exc:  # the client path reports what is wrong
            log.debug("mooncake tier: batch_get_replica_desc failed: %s", exc)
            return set()
        done = set()
        for i, name in enumerate(names):
            found = local.address(replicas.get(name, ()))
            if found is None:
                continue
            addr, size = found
            local.remember(name, found)
            if slots[i].size < size:
                self.slots.give_back(slots[i])
                slots[i] = self.slots.take(size)
            slot = slots[i]
            check = local.read(addr, size, slot.base, slot.tensor.numpy())
            if check is None:
                return done
            self._hint(name, size)
            out[i] = self._decode(keys[i], slot, size, check)
            if out[i][0] is not None:
                slots[i] = None  # leased to the engine now
            done.add(i)
        return done

    def _decode(self, key: CacheKey, slot: Slot, n: int,
                running: frame.RunningCheck | None = None) -> tuple[MemoryObj | None, bool]:
        try:
            # the decoded tensor is a view of the slot: leased until release_now
            obj = frame.decode(memoryview(slot.tensor.numpy())[:n], expect_key=key, running=running)
        except CorruptChunk as exc:
            self.corrupt_count += 1
            log.warning("mooncake tier: removing corrupt chunk %s: %s", key, exc)
            return None, True
        slot.handed_out = True
        return obj, False

    def release_now(self, obj: MemoryObj) -> None:
        if self.slots is not None:
            self.slots.release_view(obj.data)

    async def contains(self, key: CacheKey) -> bool:
        return (await self.batch_contains([key]))[0]

    async def batch_contains(self, keys: list[CacheKey]) -> list[bool]:
        """One round trip to the master for a whole prefix."""
        if not keys:
            return []
        return await self._call("lookup", self._exist_blocking, [self._name(k) for k in keys])

    @staticmethod
    def _exist_blocking(store: Any, names: list[str]) -> list[bool]:
        codes = store.batch_is_exist(names)
        if any(c in mc.UNREACHABLE for c in codes):
            raise mc.MooncakeUnavailable(f"lookup returned {codes[0]}")
        return [c == 1 for c in codes]

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        """What this process wrote or read and the store still holds (Mooncake cannot list keys)."""
        names = list(self._sizes)
        for start in range(0, len(names), 1000):
            part = names[start : start + 1000]
            present = await self._call("keys", self._exist_blocking, part)
            for name, yes in zip(part, present):
                size = self._sizes.get(name)
                if not yes or size is None:
                    continue
                try:
                    yield CacheKey.from_string(name[len(self.prefix):]), size
                except InvalidInput:
                    continue

    def stats(self) -> dict:
        b = self.breaker
        slots, regs = self.slots, self.registrations
        return {
            "breaker": b.state, "breaker_opened": b.opened, "corrupt": self.corrupt_count,
            "connected": self.store is not None, "transfer_failures": self.transfer_failures,
            "read_buffer_bytes": slots.bytes if slots else 0, "leases_reclaimed": slots.reclaimed if slots else 0,
            "registered_bytes": regs.bytes if regs else 0, "registrations": regs.registered if regs else 0,
            "abandoned_calls": self.caller.abandoned if self.caller else 0,
            "local_hits": self.local_hits, "local_stale": self.local_stale, "placed": self.placed,
            "local_places": self.local.places if self.local else 0,
        }
