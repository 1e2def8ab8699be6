"""The chunk index: which holders (instance, worker, tier) have which chunk.

A Python dict of lists (LMCache's layout) costs a bytes key, a list and a tuple
per holder per chunk, and every admit walks Python objects one at a time. Here
a chunk is one row of three numpy arrays:

- an open-addressing hash table keyed by the 128-bit chunk hash (two uint64
  columns; all-zero means empty), probed with linear probing, vectorized over a
  whole batch of hashes at once;
- a bit matrix ``mask[row, word]``: bit ``h`` is set when holder ``h`` has the
  chunk. Holders are interned to small ints; the matrix grows a uint64 column
  per 64 holders.

Removing a chunk clears bits and leaves its key in place (a dead row is reused
when the chunk comes back); dead rows are dropped when the table is rebuilt.
Clearing a whole holder (a tier cleared, a worker re-registered) is one
vectorized AND over a column.

Any index the cluster uses (this one, or ``replicas.RedisChunkIndex`` shared by
controller replicas) offers the same synchronous methods: ``holder``,
``holder_of``, ``holder_ids``, ``count``, ``digest``, ``clear_holder``, ``release_holder``,
``admit``, ``evict``, ``presence``, ``prefix_lengths``, ``len()`` and ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HASH_BYTES = 16
_U64 = np.dtype("<u8")
_MAX_LOAD = 0.5
_ONE = np.uint64(1)
#: Below this many unresolved keys, probing goes on one key at a time: a vectorized
#: round costs ~20 numpy calls whatever its size, and the longest probe run of a
#: batch (10+ slots at half load) would otherwise set the number of rounds.
_SCALAR_TAIL = 32


def hashes_to_array(hashes: bytes | bytearray | memoryview | list[bytes]) -> np.ndarray:
    """``n`` concatenated 16-byte digests (or a list of them) as an ``(n, 2)`` uint64 array."""
    if isinstance(hashes, list):
        hashes = b"".join(hashes)
    if len(hashes) % HASH_BYTES:
        raise ValueError(f"chunk hashes are {HASH_BYTES} bytes each; got {len(hashes)} bytes")
    keys = np.frombuffer(hashes, dtype=_U64).reshape(-1, 2).copy()
    # The all-zero key marks an empty slot; fold the (astronomically unlikely) real one elsewhere.
    zero = (keys[:, 0] == 0) & (keys[:, 1] == 0)
    if zero.any():
        keys[zero, 1] = 1
    return keys


@dataclass(frozen=True)
class Holder:
    instance_id: str
    worker_id: int
    tier: str


class ChunkIndex:
    """chunk hash -> set of holders, as compact arrays."""

    def __init__(self, capacity: int = 1 << 14) -> None:
        cap = 1
        while cap < capacity:
            cap <<= 1
        self._alloc(cap, 1)
        self._holders: list[Holder | None] = []
        self._holder_ids: dict[Holder, int] = {}
        self._holder_counts = np.zeros(64, dtype=np.int64)
        # Per holder, the XOR of its chunks' hashes: with the count, a digest a worker can
        # compare with its own in one small request (kept up to date by admit and evict).
        self._holder_xor = np.zeros((64, 2), dtype=_U64)
        self._used = 0  # rows with a key, live or dead
        self._live = 0  # rows with at least one holder bit

    # ---------------------------------------------------------------- storage

    def _alloc(self, cap: int, words: int) -> None:
        self._cap = cap
        self._hi = np.zeros(cap, dtype=_U64)
        self._lo = np.zeros(cap, dtype=_U64)
        self._mask = np.zeros((cap, words), dtype=_U64)

    @property
    def words(self) -> int:
        return self._mask.shape[1]

    def __len__(self) -> int:
        """Chunks held by at least one holder."""
        return self._live

    @property
    def nbytes(self) -> int:
        return self._hi.nbytes + self._lo.nbytes + self._mask.nbytes + self._holder_counts.nbytes

    def _rebuild(self, cap: int, words: int) -> None:
        live = self._mask.any(axis=1)
        hi, lo, mask = self._hi[live], self._lo[live], self._mask[live]
        self._alloc(cap, words)
        self._used = 0
        if hi.size:
            rows = self._find_or_insert(hi, lo)
            self._mask[rows, : mask.shape[1]] = mask

    def _reserve(self, extra: int) -> None:
        if self._used + extra <= _MAX_LOAD * self._cap:
            return
        need = self._live + extra
        cap = self._cap
        while need > _MAX_LOAD * cap:
            cap <<= 1
        # Mostly dead rows: rebuild at the same size instead of growing.
        self._rebuild(cap, self.words)

    # ---------------------------------------------------------------- holders

    def holder(self, instance_id: str, worker_id: int, tier: str) -> int:
        """The small int naming one holder, allocated on first use."""
        key = Holder(instance_id, worker_id, tier)
        hid = self._holder_ids.get(key)
        if hid is not None:
            return hid
        try:
            hid = self._holders.index(None)
            self._holders[hid] = key
        except ValueError:
            hid = len(self._holders)
            self._holders.append(key)
        self._holder_ids[key] = hid
        if hid // 64 >= self.words:
            grown = np.zeros((self._cap, hid // 64 + 1), dtype=_U64)
            grown[:, : self.words] = self._mask
            self._mask = grown
        if hid >= self._holder_counts.size:
            self._holder_counts = np.concatenate([self._holder_counts, np.zeros(64, dtype=np.int64)])
            self._holder_xor = np.concatenate([self._holder_xor, np.zeros((64, 2), dtype=_U64)])
        return hid

    def holder_of(self, hid: int) -> Holder | None:
        return self._holders[hid] if 0 <= hid < len(self._holders) else None

    def holder_ids(self, instance_id: str, worker_id: int | None = None) -> list[int]:
        return [
            hid
            for key, hid in self._holder_ids.items()
            if key.instance_id == instance_id and (worker_id is None or key.worker_id == worker_id)
        ]

    def count(self, hid: int) -> int:
        """Chunks holder ``hid`` has."""
        return int(self._holder_counts[hid]) if 0 <= hid < len(self._holders) else 0

    def digest(self, hid: int) -> tuple[int, str]:
        """``(chunks, xor)`` of holder ``hid``: its chunk count and the XOR of its chunk hashes
        (32 hex digits, the two little-endian halves), as ``kvstacks.agent.digest`` computes them."""
        if not 0 <= hid < len(self._holders):
            return 0, "0" * 32
        return int(self._holder_counts[hid]), self._holder_xor[hid].astype("<u8").tobytes().hex()

    def _xor_into(self, hid: int, rows: np.ndarray) -> None:
        if rows.size:
            self._holder_xor[hid, 0] ^= np.bitwise_xor.reduce(self._hi[rows])
            self._holder_xor[hid, 1] ^= np.bitwise_xor.reduce(self._lo[rows])

    def clear_holder(self, hid: int) -> int:
        """Forget every chunk of one holder; return how many it had."""
        word, bit = divmod(hid, 64)
        before = int(self._holder_counts[hid])
        if before:
            self._mask[:, word] &= ~(_ONE << np.uint64(bit))
            self._holder_counts[hid] = 0
            self._holder_xor[hid] = 0
            self._live = int(np.count_nonzero(self._mask.any(axis=1)))
        return before

    def release_holder(self, hid: int) -> None:
        """Clear a holder and free its id for reuse."""
        self.clear_holder(hid)
        key = self._holders[hid]
        if key is not None:
            del self._holder_ids[key]
            self._holders[hid] = None

    # ---------------------------------------------------------------- hashing

    def _find(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent."""
        cmask = np.uint64(self._cap - 1)
        pos = (lo & cmask).astype(np.int64)
        result = np.full(hi.size, -1, dtype=np.int64)
        active = np.arange(hi.size)
        while active.size > _SCALAR_TAIL:
            p = pos[active]
            khi, klo = self._hi[p], self._lo[p]
            match = (khi == hi[active]) & (klo == lo[active])
            result[active[match]] = p[match]
            go_on = ~match & ((khi != 0) | (klo != 0))
            active = active[go_on]
            pos[active] = (pos[active] + 1) & (self._cap - 1)
        for i in active.tolist():
            result[i] = self._probe_one(int(hi[i]), int(lo[i]), int(pos[i]), insert=False)
        return result

    def _probe_one(self, key_hi: int, key_lo: int, p: int, insert: bool) -> int:
        table_hi, table_lo, cmask = self._hi, self._lo, self._cap - 1
        while True:
            kh, kl = table_hi.item(p), table_lo.item(p)
            if kh == key_hi and kl == key_lo:
                return p
            if kh == 0 and kl == 0:
                if not insert:
                    return -1
                table_hi[p], table_lo[p] = key_hi, key_lo
                self._used += 1
                return p
            p = (p + 1) & cmask

    def _find_or_insert(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Row of each key, inserting absent ones (duplicates in the batch resolve to one row)."""
        cmask = self._cap - 1
        pos = (lo & np.uint64(cmask)).astype(np.int64)
        result = np.full(hi.size, -1, dtype=np.int64)
        active = np.arange(hi.size)
        while active.size > _SCALAR_TAIL:
            p = pos[active]
            khi, klo = self._hi[p], self._lo[p]
            match = (khi == hi[active]) & (klo == lo[active])
            result[active[match]] = p[match]
            empty = (khi == 0) & (klo == 0)
            claimers = active[empty]
            if claimers.size:
                # Several keys may want one empty slot: the first takes it, the others
                # look at the same slot again next round (a duplicate key then matches).
                slots, first = np.unique(pos[claimers], return_index=True)
                winners = claimers[first]
                self._hi[slots] = hi[winners]
                self._lo[slots] = lo[winners]
                result[winners] = slots
                self._used += slots.size
            taken = active[~match & ~empty]
            pos[taken] = (pos[taken] + 1) & cmask
            active = active[result[active] < 0]
        for i in active.tolist():
            result[i] = self._probe_one(int(hi[i]), int(lo[i]), int(pos[i]), insert=True)
        return result

    # ---------------------------------------------------------------- updates

    def admit(self, hid: int, hashes: bytes | list[bytes] | np.ndarray) -> int:
        """Holder ``hid`` now has these chunks; return how many are new to it."""
        keys = hashes if isinstance(hashes, np.ndarray) else hashes_to_array(hashes)
        if not keys.size:
            return 0
        self._reserve(len(keys))
        rows = np.unique(self._find_or_insert(keys[:, 0], keys[:, 1]))
        word, bit = divmod(hid, 64)
        flag = _ONE << np.uint64(bit)
        current = self._mask[rows]
        was_dead = ~current.any(axis=1)
        fresh = (current[:, word] & flag) == 0
        self._mask[rows, word] = current[:, word] | flag
        added = int(np.count_nonzero(fresh))
        self._holder_counts[hid] += added
        self._xor_into(hid, rows[fresh])
        self._live += int(np.count_nonzero(was_dead))
        return added

    def evict(self, hid: int, hashes: bytes | list[bytes] | np.ndarray) -> int:
        """Holder ``hid`` no longer has these chunks; return how many it had."""
        keys = hashes if isinstance(hashes, np.ndarray) else hashes_to_array(hashes)
        if not keys.size:
            return 0
        rows = self._find(keys[:, 0], keys[:, 1])
        rows = np.unique(rows[rows >= 0])
        word, bit = divmod(hid, 64)
        flag = _ONE << np.uint64(bit)
        held = rows[(self._mask[rows, word] & flag) != 0]
        if not held.size:
            return 0
        self._mask[held, word] &= ~flag
        self._holder_counts[hid] -= held.size
        self._xor_into(hid, held)
        self._live -= int(np.count_nonzero(~self._mask[held].any(axis=1)))
        return int(held.size)

    # ---------------------------------------------------------------- queries

    def presence(self, hashes: bytes | list[bytes]) -> np.ndarray:
        """``(chunks, holders)`` bool matrix: which holder has each chunk of the chain."""
        keys = hashes_to_array(hashes)
        n_holders = len(self._holders)
        if not keys.size or not n_holders:
            return np.zeros((len(keys), n_holders), dtype=bool)
        rows = self._find(keys[:, 0], keys[:, 1])
        bits = np.zeros((len(keys), self.words), dtype=_U64)
        found = rows >= 0
        bits[found] = self._mask[rows[found]]
        unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        return unpacked[:, :n_holders].astype(bool)

    def prefix_lengths(self, hashes: bytes | list[bytes], groups: list[list[int]]) -> np.ndarray:
        """For each group of holders, how many leading chunks of the chain the group has.

        A chunk counts for a group when any holder of the group has it (one worker
        with a prefix split over its cpu and disk tiers still has the prefix).
        """
        return prefix_lengths(self.presence(hashes), groups)


def prefix_lengths(present: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """``ChunkIndex.prefix_lengths`` over a presence matrix, for any index that gives one."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    member = np.zeros((present.shape[1], len(groups)), dtype=np.int32)
    for g, hids in enumerate(groups):
        for hid in hids:
            if 0 <= hid < present.shape[1]:
                member[hid, g] = 1
    covered = (
        (present.astype(np.int32) @ member) > 0
        if present.shape[1]
        else np.zeros((present.shape[0], len(groups)), dtype=bool)
    )
    return np.cumprod(covered, axis=0).sum(axis=0)
