"""Blocking calls run in daemon threads, each awaited with a deadline.

Mooncake's client blocks (an RPC to a dead master can take seconds), so the
event loop never calls it directly. A call that outlives its deadline fails the
caller at once and its thread is left to finish; a new thread takes its place
so a hung store cannot starve the tier. The threads are daemons: a call stuck
in the client never keeps the process from exiting.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class CallTimeout(TimeoutError):
    """A call did not finish within its deadline (its thread was left behind)."""


class Caller:
    def __init__(self, threads: int, name: str = "kvstacks-mooncake") -> None:
        self.size = threads
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle_or_busy = 0  # live threads not abandoned
        self.abandoned = 0  # calls whose thread was left behind, for stats
        for _ in range(threads):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._idle_or_busy += 1
        threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, loop, future, state = job
            with self._lock:
                stale = state[0] == "abandoned"  # its caller gave up before it started: do not run it
                state[0] = "running"
            if not stale:
                try:
                    result, error = fn(*args), None
                except BaseException as exc:  # handed to the awaiting coroutine
                    result, error = None, exc
                with self._lock:
                    late = state[0] == "abandoned"
                    state[0] = "done"
                if not late:
                    loop.call_soon_threadsafe(_settle, future, result, error)
                    continue
            # this thread was replaced while stuck: leave if the pool is full again
            with self._lock:
                if self._idle_or_busy >= self.size:
                    return
                self._idle_or_busy += 1

    async def call(self, timeout: float, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        state = ["queued"]
        self._jobs.put((fn, args, loop, future, state))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with self._lock:
                running = state[0] != "done"
                if running:
                    state[0] = "abandoned"
                    self._idle_or_busy -= 1
                    self.abandoned += 1
            if running:
                self._spawn()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise CallTimeout(f"no answer within {timeout:g}s") from None

    def stop(self) -> None:
        """Let idle threads exit; busy ones exit after their call."""
        for _ in range(self.size + 1):
            self._jobs.put(None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def overlap(groups: int, first: Callable[[int], Any], second: Callable[[int], Any]) -> None:
    """``first(g)`` then ``second(g)`` for each group in order, ``second(g)`` in a helper thread
    while this one runs ``first(g + 1)``.

    For work that releases the GIL (checksums, Mooncake transfers): a batch's checksums are
    computed while its earlier chunks are already on their way.
    """
    helper: threading.Thread | None = None
    errors: list[BaseException] = []

    def run(g: int) -> None:
        try:
            second(g)
        except BaseException as exc:  # raised in the calling thread below
            errors.append(exc)

    for g in range(groups):
        first(g)
        if helper is not None:
            helper.join()
            if errors:
                raise errors[0]
        helper = threading.Thread(target=run, args=(g,), daemon=True)
        helper.start()
    if helper is not None:
        helper.join()
        if errors:
            raise errors[0]


def split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` runs of nearly equal length."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts)]
