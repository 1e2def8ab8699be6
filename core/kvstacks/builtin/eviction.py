"""The builtin eviction policies: ``lru``, ``lfu``, ``fifo`` and ``s3fifo``.

Every operation is O(1) (S3-FIFO's ``pop_victim`` amortised): ordered dicts give
O(1) append, move-to-end and pop-oldest, and LFU keeps its frequencies in a
linked list of buckets so the least frequent bucket is always the head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from kvstacks.errors import ConfigError
from kvstacks.eviction import EvictionPolicy
from kvstacks.hookspecs import hookimpl


class FIFO(EvictionPolicy):
    """Evicts in insertion order; hits change nothing."""

    name = "fifo"

    def __init__(self, options: EvictionPolicy.Options | None = None) -> None:
        super().__init__(options)
        self._queue: OrderedDict[Hashable, int] = OrderedDict()  # oldest first

    def insert(self, key: Hashable, size: int) -> None:
        self._queue[key] = size  # a held key keeps its place: FIFO ignores re-admission

    def access(self, key: Hashable) -> None:
        pass

    def remove(self, key: Hashable) -> None:
        self._queue.pop(key, None)

    def pop_victim(self) -> Hashable | None:
        return self._queue.popitem(last=False)[0] if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._queue


class LRU(FIFO):
    """Evicts the key whose last insert or hit is oldest."""

    name = "lru"

    def insert(self, key: Hashable, size: int) -> None:
        self._queue[key] = size
        self._queue.move_to_end(key)

    def access(self, key: Hashable) -> None:
        if key in self._queue:
            self._queue.move_to_end(key)


class _Bucket:
    """The keys hit exactly ``freq`` times, oldest first; a node of LFU's frequency list."""

    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[Hashable, None] = OrderedDict()
        self.prev: _Bucket | None = None
        self.next: _Bucket | None = None


class LFU(EvictionPolicy):
    """Evicts the least frequently hit key; among equals, the one that reached that count first.

    Buckets of equal frequency form a list sorted by frequency, so the victim is
    the oldest key of the head bucket and a hit moves a key one bucket on: O(1)
    for every operation, with no search for the next smallest frequency. A key
    starts at frequency 1; counts are not aged, so once-hot chunks stay until
    the hot set changes enough to push them out (prefer ``s3fifo`` when scans of
    one-off prompts are common).
    """

    name = "lfu"

    def __init__(self, options: EvictionPolicy.Options | None = None) -> None:
        super().__init__(options)
        self._bucket_of: dict[Hashable, _Bucket] = {}
        self._head: _Bucket | None = None  # lowest frequency

    def _unlink(self, bucket: _Bucket) -> None:
        if bucket.prev is not None:
            bucket.prev.next = bucket.next
        else:
            self._head = bucket.next
        if bucket.next is not None:
            bucket.next.prev = bucket.prev

    def _bucket_after(self, bucket: _Bucket | None, freq: int) -> _Bucket:
        """The bucket for ``freq`` right after ``bucket`` (None: at the head), made if missing."""
        following = self._head if bucket is None else bucket.next
        if following is not None and following.freq == freq:
            return following
        new = _Bucket(freq)
        new.prev, new.next = bucket, following
        if following is not None:
            following.prev = new
        if bucket is None:
            self._head = new
        else:
            bucket.next = new
        return new

    def insert(self, key: Hashable, size: int) -> None:
        if key in self._bucket_of:
            return  # re-admission of a held key keeps its count
        bucket = self._bucket_after(None, 1)
        bucket.keys[key] = None
        self._bucket_of[key] = bucket

    def access(self, key: Hashable) -> None:
        bucket = self._bucket_of.get(key)
        if bucket is None:
            return
        target = self._bucket_after(bucket, bucket.freq + 1)
        del bucket.keys[key]
        target.keys[key] = None
        self._bucket_of[key] = target
        if not bucket.keys:
            self._unlink(bucket)

    def remove(self, key: Hashable) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is None:
            return
        del bucket.keys[key]
        if not bucket.keys:
            self._unlink(bucket)

    def pop_victim(self) -> Hashable | None:
        bucket = self._head
        if bucket is None:
            return None
        key, _ = bucket.keys.popitem(last=False)
        del self._bucket_of[key]
        if not bucket.keys:
            self._unlink(bucket)
        return key

    def frequency(self, key: Hashable) -> int:
        """How many times ``key`` was hit, plus one; 0 when not held."""
        bucket = self._bucket_of.get(key)
        return 0 if bucket is None else bucket.freq

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._bucket_of


class S3FIFO(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO and a ghost FIFO.

    New keys enter the small queue, which holds about ``small_ratio`` of the bytes.
    Most chunks are read once or never (one-off prompts): they leave from the small
    queue without disturbing the main one. A key hit at least once while in the
    small queue moves to the main queue instead of being evicted; a key evicted
    from the small queue is remembered (key only) in the ghost queue, and if it is
    inserted again while remembered it goes straight to the main queue. The main
    queue evicts its oldest key unless that key was hit since it was last
    considered, in which case it goes round again with its count lowered by one
    (counts are capped at 3, so a hot key survives at most three rounds without
    new hits). Each key is moved a bounded number of times per insert or hit, so
    ``pop_victim`` is O(1) amortised.
    """

    name = "s3fifo"

    @dataclass
    class Options:
        #: share of the held bytes the small (probationary) queue aims for
        small_ratio: float = 0.1
        #: ghost entries remembered, as a multiple of the keys in the main queue
        ghost_ratio: float = 1.0

        def __post_init__(self) -> None:
            if not 0.0 < self.small_ratio < 1.0:
                raise ConfigError("small_ratio", f"must be between 0 and 1 (exclusive), got {self.small_ratio}")
            if not self.ghost_ratio >= 0:
                raise ConfigError("ghost_ratio", f"must be 0 or more, got {self.ghost_ratio}")

    MAX_FREQ = 3

    def __init__(self, options: S3FIFO.Options | None = None) -> None:
        super().__init__(options)
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._small_bytes = 0
        self._main_bytes = 0

    def insert(self, key: Hashable, size: int) -> None:
        size = max(int(size), 1)
        if key in self._small:
            self._small_bytes += size - self._small[key]
            self._small[key] = size
            return
        if key in self._main:
            self._main_bytes += size - self._main[key]
            self._main[key] = size
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
            self._main_bytes += size
        else:
            self._small[key] = size
            self._small_bytes += size

    def access(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.MAX_FREQ:
            self._freq[key] = freq + 1

    def remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        else:
            self._main_bytes -= self._main.pop(key)

    def _remember(self, key: Hashable) -> None:
        self._ghost[key] = None
        limit = int(self.options.ghost_ratio * max(len(self._main), 1))
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    def pop_victim(self) -> Hashable | None:
        while self._small or self._main:
            total = self._small_bytes + self._main_bytes
            if self._small and (not self._main or self._small_bytes >= self.options.small_ratio * total):
                key, size = self._small.popitem(last=False)
                self._small_bytes -= size
                if self._freq[key] > 0:
                    # Hit during probation: promoted, and it must earn further rounds in main anew.
                    self._freq[key] = 0
                    self._main[key] = size
                    self._main_bytes += size
                    continue
                del self._freq[key]
                self._remember(key)
                return key
            key = next(iter(self._main))
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                self._main.move_to_end(key)
                continue
            self._main_bytes -= self._main.pop(key)
            del self._freq[key]
            return key
        return None

    def queue_of(self, key: Hashable) -> str | None:
        """``"small"``, ``"main"``, ``"ghost"`` or ``None``: where the policy keeps ``key``."""
        if key in self._small:
            return "small"
        if key in self._main:
            return "main"
        if key in self._ghost:
            return "ghost"
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._freq


@hookimpl
def register_eviction_policies(register) -> None:
    for policy in (LRU, LFU, FIFO, S3FIFO):
        register(policy)
