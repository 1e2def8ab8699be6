"""CacheEngine: the tier stack behind ``store``, ``lookup`` and ``retrieve``.

The sync API runs in the caller's thread. A hit in an in-process top tier (the
CPU tier) never leaves it: no event loop, no thread hop. Everything else runs on
the engine's I/O loop. Async twins hand the sync call to a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kvstacks import metrics
from kvstacks.compression import Compressor
from kvstacks.config import StackConfig, in_tier, load_yaml, parse_stack
from kvstacks.errors import ConfigError, InvalidInput, TierFull
from kvstacks.keys import CacheKey, as_token_array, chunk_bounds, hash_chain
from kvstacks.loop import IOLoop
from kvstacks.memory import KV_DTYPES, MemoryObj, check_kv, return_freed_memory
from kvstacks.offload import Job, Offloader
from kvstacks.plugins import pm, registry
from kvstacks.tier import Tier

log = logging.getLogger("kvstacks.engine")

Tokens = Sequence[int] | torch.Tensor | np.ndarray


class _Validated(np.ndarray):
    """Tokens ``as_token_array`` already checked, so they are not checked twice."""


class Cleared(NamedTuple):
    """What ``clear`` removed: chunks (one per tier holding it) and the distinct tokens they held."""

    chunks: int
    tokens: int


class CacheEngine:
    """A stack of tiers, top (fastest) first, configured from YAML or a dict."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._registry = registry()
        self._coders: dict[str, Compressor] = {}
        self._salt = config.salt.encode()
        self._closed = False
        self._close_lock = threading.Lock()
        # (layers, hidden, dtype) of this engine's KV, from the last store or retrieve: one
        # (model, kv_format) has one layout, so a chunk claiming another is lying.
        self._layout: tuple[int, int, torch.dtype] | None = None
        self.tiers: list[Tier] = []
        for tc in config.stack:
            try:
                backend = self._registry.create("backends", tc.backend, tc.backend_options)
                policy = self._registry.create("eviction_policies", tc.eviction, tc.eviction_options)
                compressor = self._registry.get("compressors", tc.compressor)(tc.compressor_options)
            except ConfigError as exc:
                raise in_tier(tc.path, exc) from None
            self.tiers.append(Tier(tc, backend, policy, compressor, self.compressor, config.model, config.chunk_size))
        self._by_name = {t.name: t for t in self.tiers}
        for tier in self.tiers:
            tier.on_lost = lambda keys, tier=tier: self._lost(tier, keys)
        self._write_back = config.write_mode == "back" and len(self.tiers) > 1
        top = self.tiers[0]
        if top.in_process:
            # Tiers below that write the top tier's objects unchanged take the frame check the
            # top tier computed as it copied each chunk in, instead of reading the chunk again.
            top.backend.carry_checks = any(
                not t.in_process and not t.read_only and t.compressor.name == top.compressor.name for t in self.tiers[1:]
            )
        self.io = IOLoop()
        try:
            self.io.run(self._start())
        except BaseException:
            self.io.stop()
            raise
        self.offloader = Offloader(self.io, self.tiers[1:], config.offload, self._offloaded,
                                   config.offload.queue_budget(self.tiers[0].capacity))
        self.requests = 0
        self.query_tokens = 0
        self.hit_tokens = 0
        metrics.track(self)
        pm.hook.kvstacks_startup(engine=self)

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> CacheEngine:
        return cls(load_yaml(path))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | StackConfig) -> CacheEngine:
        return cls(config if isinstance(config, StackConfig) else parse_stack(config))

    async def _start(self) -> None:
        for tier in self.tiers:
            try:
                await tier.backend.start()
            except ConfigError as exc:
                raise in_tier(tier.config.path, exc) from None
            except Exception as exc:
                # A remote store that is down at start must not stop the engine: its calls fail and count.
                tier.stats.errors += 1
                log.warning("tier %s (%s) did not start, it will miss until it works: %s", tier.name, tier.config.backend, exc)
                continue
            if not tier.shared:
                try:
                    await tier.rebuild_index()
                except Exception as exc:
                    tier.stats.errors += 1
                    log.warning("tier %s: could not list existing chunks: %s", tier.name, exc)

    def compressor(self, name: str) -> Compressor:
        """A compressor instance by name (default options), shared by the engine's tiers."""
        coder = self._coders.get(name)
        if coder is None:
            if ("compressors", name) not in self._registry:
                raise InvalidInput(f"unknown compressor {name!r}; installed: {', '.join(self._registry.names('compressors'))}")
            coder = self._coders[name] = self._registry.create("compressors", name)
        return coder

    def tier(self, name: str) -> Tier:
        tier = self._by_name.get(name)
        if tier is None:
            raise InvalidInput(f"no tier named {name!r} in this stack; tiers: {', '.join(self._by_name)}")
        return tier

    # -- keys ----------------------------------------------------------------

    def _chunks(self, tokens: Tokens) -> tuple[list[CacheKey], list[tuple[int, int]]]:
        arr = tokens if isinstance(tokens, _Validated) else as_token_array(tokens)
        cfg = self.config
        hashes = hash_chain(arr, cfg.chunk_size, self._salt, cfg.store_partial)
        keys = [CacheKey(cfg.model, cfg.kv_format, cfg.world_size, cfg.rank, h) for h in hashes]
        return keys, chunk_bounds(len(arr), cfg.chunk_size, cfg.store_partial)

    def chunk_keys(self, tokens: Tokens) -> list[CacheKey]:
        return self._chunks(tokens)[0]

    # -- store -----------------------------------------------------------------

    def store(self, tokens: Tokens, kv: torch.Tensor) -> int:
        """Store the KV of ``tokens``; return how many tokens were newly stored in the top tier."""
        self._check_open()
        started = time.perf_counter()
        arr = as_token_array(tokens).view(_Validated)
        kv = check_kv(kv, len(arr))
        keys, bounds = self._chunks(arr)
        top = self.tiers[0]
        admitted: list[CacheKey] = []
        evicted_keys: list[CacheKey] = []
        stored = 0
        through = self.config.write_mode == "through" and len(self.tiers) > 1
        layers, hidden, dtype = kv.shape[1], kv.shape[3], kv.dtype
        self._layout = (layers, hidden, dtype)
        parts = kv.split(self.config.chunk_size, dim=2)  # every chunk's view in one call
        views = []
        resend = []  # held by the top tier but missing below (dropped, evicted, or lost by a shared store)
        lower = self.tiers[1:] if through else ()
        for key, (start, end), part in zip(keys, bounds, parts):
            if key in top.index:
                top.touch(key)
                for tier in lower:
                    if key not in tier.index:
                        resend.append(MemoryObj(key, part, (2, layers, end - start, hidden), dtype))
                        break
                continue
            views.append(MemoryObj(key, part, (2, layers, end - start, hidden), dtype))
        if top.in_process:
            kept_all = [self._put_top(view.key, view, evicted_keys) for view in views]
        else:
            kept_all = self._put_remote_top(views, evicted_keys)
        for view, kept in zip(views, kept_all):
            key = view.key
            if kept:
                admitted.append(key)
                stored += view.num_tokens
            if through:
                leased = top.backend.get_now(key) if kept and top.in_process else None
                self._offload_down(0, key, leased if leased is not None else self._stable(view), leased)
        for view in resend:
            leased = top.backend.get_now(view.key) if top.in_process else None
            self._offload_down(0, view.key, leased if leased is not None else self._stable(view), leased, fresh=False)
        if admitted:
            pm.hook.chunks_admitted(engine=self, tier=top.name, keys=admitted)
        if evicted_keys:
            pm.hook.chunks_evicted(engine=self, tier=top.name, keys=evicted_keys)
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        return stored

    @staticmethod
    def _stable(view: MemoryObj) -> MemoryObj:
        """A copy the caller cannot change after ``store`` returns (same bytes: the check carries over)."""
        return MemoryObj(view.key, view.data.clone(), view.shape, view.dtype, view.compressor, view.check)

    def _put_top(self, key: CacheKey, view: MemoryObj, evicted_keys: list[CacheKey]) -> bool:
        """Write to an in-process top tier at once; False if it refused or failed (counted, logged).

        Victims' keys are appended to ``evicted_keys`` for one observer call per ``store``.
        """
        top = self.tiers[0]
        try:
            evicted = top.put_now(key, view, keep_victims=self._write_back)
        except TierFull:
            return False
        except Exception as exc:
            top.failed("put", exc)
            return False
        if evicted:
            self._drop_victims(0, evicted)
            evicted_keys.extend(k for k, _ in evicted)
        return True

    def _put_remote_top(self, views: list[MemoryObj], evicted_keys: list[CacheKey]) -> list[bool]:
        """Write every chunk to a top tier that does I/O, concurrently, in one hop to the I/O loop."""
        top = self.tiers[0]
        if not views:
            return []

        async def put_all() -> list[Any]:
            return await asyncio.gather(*(top.aput(v.key, v) for v in views), return_exceptions=True)

        kept = []
        for result in self.io.run(put_all()):
            if isinstance(result, BaseException):
                if not isinstance(result, TierFull):
                    top.failed("put", result)
                kept.append(False)
            else:
                evicted_keys.extend(k for k, _ in result)
                kept.append(True)
        return kept

    def _drop_victims(self, level: int, evicted: Sequence[tuple[CacheKey, MemoryObj | None]]) -> None:
        """Victims of tier ``level``: demote them (write-back) and remove them from an in-process tier."""
        tier = self.tiers[level]
        for key, obj in evicted:
            if obj is not None and level + 1 < len(self.tiers) and not self.tiers[level + 1].read_only:
                self._submit(self.tiers[level + 1], self._stable(obj))
            if tier.in_process:
                tier.drop_now(key, obj)

    def _offload_down(self, level: int, key: CacheKey, obj: MemoryObj, leased: MemoryObj | None,
                      fresh: bool = True) -> None:
        """Queue ``obj`` for every tier below ``level``; end the lease on ``leased`` when all are written.

        A ``fresh`` chunk (new to tier ``level``) goes to every shared tier even if its index
        lists the key: the server may have forgotten it, and the tier checks before writing.
        """
        source = self.tiers[level]
        targets = [
            t for t in self.tiers[level + 1:] if not t.read_only and (not t.has(key) or (fresh and t.shared))
        ]
        done = None if leased is None else self._release_after(source, leased, len(targets))
        for target in targets:
            self._submit(target, obj, done)

    @staticmethod
    def _release_after(source: Tier, leased: MemoryObj, writes: int) -> Any:
        """A callback that releases ``leased`` once ``writes`` queued writes are done (at once if none)."""
        if writes == 0:
            source.backend.release_now(leased)
            return None
        remaining = [writes]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                source.backend.release_now(leased)

        return done

    def _put_in_process(self, tier: Tier, key: CacheKey, obj: MemoryObj, encode: bool = True) -> None:
        """Store in an in-process tier outside ``store``: victims demoted (write-back), everything reported."""
        evicted = tier.put_now(key, obj, encode, keep_victims=self._write_back)
        if evicted:
            self._drop_victims(self.tiers.index(tier), evicted)
        self._reported(tier, key, [k for k, _ in evicted])

    async def _put(self, tier: Tier, key: CacheKey, obj: MemoryObj, encode: bool = True) -> None:
        """Store in any tier from the I/O loop; every path that admits or evicts outside ``store``
        goes through here (or ``_put_in_process``), so the controller hears of each change."""
        if tier.in_process:
            self._put_in_process(tier, key, obj, encode)
        else:
            self._reported(tier, key, [k for k, _ in await tier.aput(key, obj, encode)])

    def _reported(self, tier: Tier, key: CacheKey, victims: list[CacheKey]) -> None:
        pm.hook.chunks_admitted(engine=self, tier=tier.name, keys=[key])
        if victims:
            pm.hook.chunks_evicted(engine=self, tier=tier.name, keys=victims)

    def _lost(self, tier: Tier, keys: list[CacheKey]) -> None:
        """A tier found chunks gone or corrupt on read and forgot them."""
        pm.hook.chunks_evicted(engine=self, tier=tier.name, keys=keys)

    def _submit(self, target: Tier, obj: MemoryObj, done: Any = None) -> None:
        self.offloader.submit(Job(target, obj.key, obj, obj.nbytes, done))

    def _offloaded(self, tier: Tier, key: CacheKey, victims: list[tuple[CacheKey, int]]) -> None:
        self._reported(tier, key, [k for k, _ in victims])

    # -- lookup ----------------------------------------------------------------

    def _locate(self, keys: list[CacheKey], peers: bool = True) -> list[int]:
        """For the longest cached prefix, the index of a tier holding each chunk.

        ``peers=False`` leaves out read-only tiers (the peer tier): what this engine itself holds.
        """
        n = len(keys)
        where = [-1] * n
        for level, tier in enumerate(self.tiers):
            if tier.shared:
                continue
            index = tier.index
            for j in range(n):
                if where[j] < 0 and keys[j] in index:
                    where[j] = level
        prefix = where.index(-1) if -1 in where else n
        shared = [level for level, t in enumerate(self.tiers) if t.shared and (peers or not t.read_only)]
        if prefix < n and shared:
            rest = keys[prefix:]
            answers = self.io.run(self._ask_shared(shared, rest))
            for level, present in zip(shared, answers):
                for offset, yes in enumerate(present):
                    if yes and where[prefix + offset] < 0:
                        where[prefix + offset] = level
            prefix = where.index(-1) if -1 in where else n
        return where[:prefix]

    async def _ask_shared(self, levels: list[int], keys: list[CacheKey]) -> list[list[bool]]:
        return list(await asyncio.gather(*(self.tiers[level].abatch_contains(keys) for level in levels)))

    def lookup(self, tokens: Tokens) -> int:
        """Tokens of the longest prefix of ``tokens`` cached in any tier."""
        self._check_open()
        keys, bounds = self._chunks(tokens)
        where = self._locate(keys)
        return bounds[len(where) - 1][1] if where else 0

    def lookup_tiers(self, tokens: Tokens) -> dict[str, int]:
        """For each tier, the tokens of the longest prefix that tier alone holds."""
        self._check_open()
        keys, bounds = self._chunks(tokens)
        result = {}
        for tier in self.tiers:
            if tier.shared:
                present = self.io.run(tier.abatch_contains(keys))
            else:
                present = [k in tier.index for k in keys]
            run = present.index(False) if False in present else len(keys)
            result[tier.name] = bounds[run - 1][1] if run else 0
        return result

    # -- retrieve --------------------------------------------------------------

    def retrieve(self, tokens: Tokens, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
        """Load the longest cached prefix: ``(kv [2, layers, n, hidden], n)``, or ``(None, 0)``.

        With ``out`` (``[2, layers, >= n, hidden]``), the KV is written there and a view returned.
        Chunks found in lower tiers are promoted to the tiers above.
        """
        self._check_open()
        started = time.perf_counter()
        keys, bounds = self._chunks(tokens)
        layout = self._layout
        if out is not None:
            wanted = self._out_layout(out)
            if layout is not None and wanted != layout:
                raise InvalidInput(f"out has {wanted[0]} layers, hidden {wanted[1]}, {wanted[2]}; this engine's KV "
                                   f"has {layout[0]} layers, hidden {layout[1]}, {layout[2]}")
        where = self._locate(keys)
        objs: list[MemoryObj | None] = [None] * len(where)
        held: list[tuple[Tier, list[CacheKey], list[MemoryObj | None]]] = []
        remote: dict[int, list[int]] = defaultdict(list)
        try:
            local: dict[int, list[int]] = defaultdict(list)
            for j, level in enumerate(where):
                (local if self.tiers[level].in_process else remote)[level].append(j)
            for level, js in local.items():
                tier = self.tiers[level]
                tier_keys = [keys[j] for j in js]
                tier.acquire(tier_keys)
                get_now = tier.backend.get_now
                leased = [get_now(key) for key in tier_keys]
                held.append((tier, tier_keys, leased))
                for j, obj in zip(js, leased):
                    objs[j] = obj
            raw: dict[int, MemoryObj] = {}
            # Chunks read straight into the caller's out by a lower tier: nothing to copy, no buffer.
            placed: set[int] = set()
            if remote:
                places = self._places(out, bounds, remote) if out is not None else None
                fetched = self.io.run(self._fetch(remote, keys, places))
                for j, obj in fetched.items():
                    objs[j] = obj
                    if obj is not None:
                        raw[j] = obj
                        if places is not None and obj.data is places.get(j):
                            placed.add(j)
            n_ok = objs.index(None) if None in objs else len(objs)
            self._count(where, n_ok, len(keys))
            self.requests += 1
            self.query_tokens += bounds[-1][1] if bounds else 0
            decoded = []
            for j in range(n_ok):
                obj = self._checked(self.tiers[where[j]], keys[j], bounds[j], objs[j], layout)  # type: ignore[arg-type]
                if obj is None:
                    n_ok = j  # a miss from here on: the chunks before it are served
                    break
                decoded.append(obj)
                layout = (obj.shape[1], obj.shape[3], obj.dtype)
            if n_ok:
                layers, hidden, dtype = layout  # type: ignore[misc]
                self._layout = layout
            if n_ok == 0:
                self._promote(where, [], raw, placed)
                metrics.RETRIEVE_SECONDS.observe(time.perf_counter() - started)
                return None, 0
            total = bounds[n_ok - 1][1]
            result = self._output(out, layers, total, hidden, dtype)
            if out is None:
                torch.cat([d.data for d in decoded[:n_ok]], dim=2, out=result)  # one call copies every chunk
            else:
                for j in range(n_ok):
                    start, end = bounds[j]
                    if j not in placed:
                        result.narrow(2, start, end - start).copy_(decoded[j].data)
            self.hit_tokens += total
        finally:
            for tier, tier_keys, leased in held:
                tier.release(tier_keys)
                release_now = tier.backend.release_now
                for obj in leased:
                    if obj is not None:
                        release_now(obj)
        self._promote(where, decoded[:n_ok], raw, placed)
        metrics.RETRIEVE_SECONDS.observe(time.perf_counter() - started)
        return result, total

    @staticmethod
    def _places(out: torch.Tensor, bounds: list[tuple[int, int]], remote: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Where each chunk read from a lower tier goes in ``out`` (a validated layout), if ``out`` has room."""
        room = out.shape[2]
        return {j: out[:, :, bounds[j][0]:bounds[j][1]] for js in remote.values() for j in js if bounds[j][1] <= room}

    async def _fetch(self, remote: dict[int, list[int]], keys: list[CacheKey],
                     places: dict[int, torch.Tensor] | None = None) -> dict[int, MemoryObj | None]:
        """One batch per tier, the tiers in parallel; with ``places``, backends may read straight into them."""
        levels = list(remote)

        def batch(level: int) -> Any:
            js = remote[level]
            tier_keys = [keys[j] for j in js]
            if places is not None and all(j in places for j in js):
                return self.tiers[level].abatch_get(tier_keys, [places[j] for j in js])
            return self.tiers[level].abatch_get(tier_keys)

        batches = await asyncio.gather(*(batch(level) for level in levels))
        return {j: obj for level, objs in zip(levels, batches) for j, obj in zip(remote[level], objs)}

    def _count(self, where: list[int], n_ok: int, n_keys: int) -> None:
        for j in range(min(n_ok + 1, n_keys)):
            served = where[j] if j < n_ok else len(self.tiers)
            for level, tier in enumerate(self.tiers[: served + 1]):
                if level == served:
                    tier.stats.hits += 1
                else:
                    tier.stats.misses += 1

    def _checked(self, tier: Tier, key: CacheKey, bounds: tuple[int, int], obj: MemoryObj,
                 layout: tuple[int, int, torch.dtype] | None) -> MemoryObj | None:
        """``obj`` decoded, if it is what ``key`` must hold; else None, and the chunk is dropped as corrupt.

        A frame's checksum proves the bytes are the ones written, not that the writer told the
        truth: the chunk must hold this key, exactly this chunk's tokens, a KV dtype, and the
        layers and hidden size of the rest of the prefix (or of ``out``, or of this engine's KV).
        """
        try:
            decoded = tier.decode(obj)
        except Exception as exc:  # garbage under a valid frame: the compressor could not decode it
            tier.found_corrupt(key, f"cannot be decoded: {exc}")
            self._remove_corrupt(tier, key)
            return None
        tokens = bounds[1] - bounds[0]
        shape, data = decoded.shape, decoded.data
        if decoded.key != key:
            reason = f"holds key {decoded.key}"
        elif len(shape) != 4 or shape[0] != 2:
            reason = f"has shape {tuple(shape)}, not [2, layers, tokens, hidden]"
        elif shape[2] != tokens:
            reason = f"claims {shape[2]} tokens where this chunk has {tokens}"
        elif decoded.dtype not in KV_DTYPES:
            reason = f"holds {decoded.dtype}, not a KV dtype"
        elif tuple(data.shape) != tuple(shape) or data.dtype != decoded.dtype:
            reason = f"decoded to {tuple(data.shape)} {data.dtype}, not the {tuple(shape)} {decoded.dtype} it claims"
        elif layout is not None and (shape[1], shape[3], decoded.dtype) != layout:
            reason = (f"has {shape[1]} layers, hidden {shape[3]}, {decoded.dtype} where {layout[0]} layers, "
                      f"hidden {layout[1]}, {layout[2]} are expected")
        else:
            return decoded
        tier.found_corrupt(key, reason)
        self._remove_corrupt(tier, key)
        return None

    def _remove_corrupt(self, tier: Tier, key: CacheKey) -> None:
        try:
            if tier.in_process:
                tier.backend.remove_now(key)  # readers holding a lease keep their bytes until they release
            else:
                self.io.run(tier.backend.remove(key))
        except Exception as exc:
            tier.failed("remove of a corrupt chunk", exc)

    @staticmethod
    def _out_layout(out: Any) -> tuple[int, int, torch.dtype]:
        """The layout the caller's ``out`` asks for; a malformed ``out`` is the caller's mistake."""
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 2 or out.dtype not in KV_DTYPES:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInput(f"out must be a float16, bfloat16 or float32 tensor [2, layers, >= tokens, hidden], got {got}")
        return out.shape[1], out.shape[3], out.dtype

    @staticmethod
    def _output(out: torch.Tensor | None, layers: int, tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        if out is None:
            return torch.empty((2, layers, tokens, hidden), dtype=dtype)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 2 or out.shape[1] != layers \
                or out.shape[2] < tokens or out.shape[3] != hidden or out.dtype != dtype:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInput(f"out must be a {dtype} tensor of shape [2, {layers}, >= {tokens}, {hidden}], got {got}")
        return out[:, :, :tokens]

    def _promote(self, where: list[int], decoded: list[MemoryObj], raw: dict[int, MemoryObj], placed: set[int]) -> None:
        """Copy chunks found in lower tiers into the tiers above, then release what was read.

        Chunks in ``placed`` were read straight into the caller's ``out``, which is the caller's
        again once ``retrieve`` returns: queued writes get a copy of them.
        """
        top = self.tiers[0]
        for j, (level, obj) in enumerate(zip(where, decoded)):
            if level == 0:
                continue
            if top.in_process and not top.has(obj.key):
                try:
                    self._put_in_process(top, obj.key, obj)
                except TierFull:
                    pass
                except Exception as exc:
                    top.failed("promotion", exc)
            targets = [t for t in self.tiers[1 if top.in_process else 0:level] if not t.read_only and not t.has(obj.key)]
            if j in placed:
                stable = self._stable(obj) if targets else obj
                for tier in targets:
                    self._submit(tier, stable)
                continue
            leased = raw.get(j)
            # A decoded copy no longer needs the read buffer; raw KV does until it is written up.
            shares = leased is not None and leased.data is obj.data
            done = self._release_after(self.tiers[level], leased, len(targets) if shares else 0) if leased else None
            for tier in targets:
                self._submit(tier, obj, done if shares else None)
        for j in range(len(decoded), len(where)):
            if j in raw:
                self.tiers[where[j]].backend.release_now(raw[j])

    # -- management --------------------------------------------------------------

    def _tiers(self, tier: str | None) -> list[Tier]:
        return self.tiers if tier is None else [self.tier(tier)]

    def pin(self, tokens: Tokens, ttl: float | None = None, tier: str | None = None) -> int:
        """Keep the chunks of ``tokens`` from eviction (for ``ttl`` seconds); return tokens pinned."""
        self._check_open()
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            raise InvalidInput(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        keys, bounds = self._chunks(tokens)
        pinned = 0
        for key, (start, end) in zip(keys, bounds):
            if any([t.pin(key, ttl) for t in self._tiers(tier)]):
                pinned += end - start
        return pinned

    def unpin(self, tokens: Tokens, tier: str | None = None) -> int:
        self._check_open()
        keys, bounds = self._chunks(tokens)
        return sum(end - start for key, (start, end) in zip(keys, bounds)
                   if any([t.unpin(key) for t in self._tiers(tier)]))

    def remove(self, tokens: Tokens, tier: str | None = None) -> int:
        """Remove the chunks of ``tokens``; return tokens removed from at least one tier."""
        self._check_open()
        keys, bounds = self._chunks(tokens)
        tiers = self._tiers(tier)
        removed = self.io.run(self._remove(tiers, keys))
        return sum(end - start for yes, (start, end) in zip(removed, bounds) if yes)

    async def _remove(self, tiers: list[Tier], keys: list[CacheKey]) -> list[bool]:
        hits = [False] * len(keys)
        for tier in tiers:
            gone = [j for j, key in enumerate(keys) if await tier.aremove(key)]
            for j in gone:
                hits[j] = True
            if gone:
                pm.hook.chunks_evicted(engine=self, tier=tier.name, keys=[keys[j] for j in gone])
        return hits

    def clear(self, tier: str | None = None) -> Cleared:
        """Empty one tier, or all; return the chunks removed and the tokens they held."""
        self._check_open()
        return self.io.run(self._clear(self._tiers(tier)))

    async def _clear(self, tiers: list[Tier]) -> Cleared:
        chunks = 0
        tokens: dict[CacheKey, int] = {}
        for tier in tiers:
            keys = list(tier.index)
            tokens.update(tier.tokens_of(keys))
            chunks += await tier.aclear()
            if keys:
                pm.hook.chunks_evicted(engine=self, tier=tier.name, keys=keys)
        return Cleared(chunks, sum(tokens.values()))

    def _prefix_in(self, tier: Tier, keys: list[CacheKey]) -> int:
        if tier.shared:
            present = self.io.run(tier.abatch_contains(keys))
        else:
            present = [k in tier.index for k in keys]
        return present.index(False) if False in present else len(keys)

    def move(self, tokens: Tokens, src: str, dst: str, copy: bool = True) -> int:
        """Move (or copy) the prefix of ``tokens`` held by tier ``src`` to tier ``dst``; return tokens moved."""
        self._check_open()
        source, target = self.tier(src), self.tier(dst)
        if source is target:
            raise InvalidInput(f"source and destination are the same tier ({src})")
        keys, bounds = self._chunks(tokens)
        run = self._prefix_in(source, keys)
        moved = self.io.run(self._move(source, target, keys[:run], copy))
        return bounds[moved - 1][1] if moved else 0

    async def _move(self, source: Tier, target: Tier, keys: list[CacheKey], copy: bool) -> int:
        done = 0
        for key in keys:
            obj = await source.aget(key, decode=False)
            if obj is None:
                break
            try:
                await self._put(target, key, obj)
            except Exception as exc:
                log.warning("move to %s stopped: %s", target.name, exc)
                break
            if not copy:
                await source.aremove(key)
                pm.hook.chunks_evicted(engine=self, tier=source.name, keys=[key])
            done += 1
        return done

    def compress(self, tokens: Tokens, method: str, tier: str) -> int:
        """Re-encode the chunks of ``tokens`` held by ``tier`` with compressor ``method``; return tokens."""
        self._check_open()
        coder = self.compressor(method)
        target = self.tier(tier)
        if target.config.lossless and not coder.lossless:
            raise InvalidInput(f"tier {tier} is lossless: true and {method!r} is lossy")
        keys, bounds = self._chunks(tokens)
        run = self._prefix_in(target, keys)
        done = self.io.run(self._recode(target, keys[:run], coder))
        return bounds[done - 1][1] if done else 0

    def decompress(self, tokens: Tokens, tier: str) -> int:
        return self.compress(tokens, "none", tier)

    async def _recode(self, tier: Tier, keys: list[CacheKey], coder: Compressor) -> int:
        done = 0
        for key in keys:
            obj = await tier.aget(key, decode=True)
            if obj is None:
                break
            encoded = await asyncio.to_thread(coder.encode, obj) if coder.name != "none" else obj
            pinned = key in tier.pins
            await tier.aremove(key)
            try:
                await self._put(tier, key, encoded, encode=False)
            except Exception as exc:
                # Removed and not stored again (no room for a bigger encoding): it is gone.
                pm.hook.chunks_evicted(engine=self, tier=tier.name, keys=[key])
                log.warning("tier %s: re-encoding with %s stopped: %s", tier.name, coder.name, exc)
                break
            if pinned:
                tier.pin(key, None)
            done += 1
        return done

    def export_chunks(self, tokens: Tokens, tier: str | None = None) -> list[MemoryObj]:
        """The chunks of the cached prefix of ``tokens``, as stored (possibly compressed), copied out."""
        return self.export_keys(self._chunks(tokens)[0], tier)

    def export_keys(self, keys: list[CacheKey], tier: str | None = None) -> list[MemoryObj]:
        """``export_chunks`` by chunk keys (a peer asks by hashes); never from a peer tier."""
        self._check_open()
        if tier is None:
            where = self._locate(keys, peers=False)
        else:
            level = self.tiers.index(self.tier(tier))
            where = [level] * self._prefix_in(self.tiers[level], keys)
        return self.io.run(self._export(where, keys))

    async def _export(self, where: list[int], keys: list[CacheKey]) -> list[MemoryObj]:
        out = []
        for j, level in enumerate(where):
            tier = self.tiers[level]
            obj = await tier.aget(keys[j], decode=False)
            if obj is None:
                break
            out.append(obj)
        return out

    def import_chunks(self, objs: Iterable[MemoryObj], tier: str | None = None) -> int:
        """Store chunks exported by another engine; return tokens imported."""
        self._check_open()
        target = self.tiers[0] if tier is None else self.tier(tier)
        objs = list(objs)
        for obj in objs:
            if not isinstance(obj, MemoryObj):
                raise InvalidInput(f"import_chunks takes MemoryObj values, got {type(obj).__name__}")
        return self.io.run(self._import(target, objs))

    async def _import(self, target: Tier, objs: list[MemoryObj]) -> int:
        tokens = 0
        for obj in objs:
            try:
                await self._put(target, obj.key, obj)
            except TierFull:
                break
            tokens += obj.shape[2]
        return tokens

    def keys(self, tier: str | None = None) -> dict[str, list[CacheKey]]:
        """The chunks each tier holds, as this engine knows them."""
        out = {}
        for t in self._tiers(tier):
            with t.lock:
                out[t.name] = list(t.index)
        return out

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per tier: objects, bytes, capacity, hits, misses, evictions, pins, queue depth, errors..."""
        out = {}
        for tier in self.tiers:
            snap = tier.snapshot()
            snap["queue_depth"] = self.offloader.depth.get(tier.name, 0)
            out[tier.name] = snap
        return out

    # -- lifecycle -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("this engine is closed; create a new CacheEngine")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write to the lower tiers is done; False on timeout."""
        return self.offloader.drain(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Wait for pending offloads (up to ``timeout`` s), then close every backend."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if not self.flush(timeout):
            log.warning("closing with offloads still pending after %.0f s; they are dropped", timeout)
        try:
            pm.hook.kvstacks_shutdown(engine=self)
        except Exception as exc:
            log.warning("a plugin's kvstacks_shutdown failed: %s", exc)
        try:
            self.io.run(self._shutdown(), timeout=timeout)
        except Exception as exc:
            log.warning("closing backends: %s", exc)
        self.io.stop()
        for tier in self.tiers:
            tier.burst.flush()  # the count of a burst still held back
        metrics.untrack(self)
        return_freed_memory()

    async def _shutdown(self) -> None:
        await self.offloader.stop()
        for tier in self.tiers:
            try:
                await asyncio.wait_for(tier.backend.close(), 10)
            except Exception as exc:
                log.warning("tier %s did not close cleanly: %s", tier.name, exc)

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- async twins -------------------------------------------------------------
    # Each runs its sync twin on a worker thread, so an asyncio caller never blocks.

    async def astore(self, tokens: Tokens, kv: torch.Tensor) -> int:
        return await asyncio.to_thread(self.store, tokens, kv)

    async def alookup(self, tokens: Tokens) -> int:
        return await asyncio.to_thread(self.lookup, tokens)

    async def alookup_tiers(self, tokens: Tokens) -> dict[str, int]:
        return await asyncio.to_thread(self.lookup_tiers, tokens)

    async def aretrieve(self, tokens: Tokens, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
        return await asyncio.to_thread(self.retrieve, tokens, out)

    async def apin(self, tokens: Tokens, ttl: float | None = None, tier: str | None = None) -> int:
        return await asyncio.to_thread(self.pin, tokens, ttl, tier)

    async def aunpin(self, tokens: Tokens, tier: str | None = None) -> int:
        return await asyncio.to_thread(self.unpin, tokens, tier)

    async def aremove(self, tokens: Tokens, tier: str | None = None) -> int:
        return await asyncio.to_thread(self.remove, tokens, tier)

    async def aclear(self, tier: str | None = None) -> Cleared:
        return await asyncio.to_thread(self.clear, tier)

    async def amove(self, tokens: Tokens, src: str, dst: str, copy: bool = True) -> int:
        return await asyncio.to_thread(self.move, tokens, src, dst, copy)

    async def acompress(self, tokens: Tokens, method: str, tier: str) -> int:
        return await asyncio.to_thread(self.compress, tokens, method, tier)

    async def adecompress(self, tokens: Tokens, tier: str) -> int:
        return await asyncio.to_thread(self.decompress, tokens, tier)

    async def aexport_chunks(self, tokens: Tokens, tier: str | None = None) -> list[MemoryObj]:
        return await asyncio.to_thread(self.export_chunks, tokens, tier)

    async def aimport_chunks(self, objs: Iterable[MemoryObj], tier: str | None = None) -> int:
        return await asyncio.to_thread(self.import_chunks, list(objs), tier)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
