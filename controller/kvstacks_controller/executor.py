"""The executor: sends commands to workers with timeouts and tracks events.

Every operator command gets an event id. A command that finishes within its
wait budget answers at once with its result; one that does not (a move, a
compress of a large prefix) answers ``pending`` and keeps running, and
``/check_finish`` reports ``pending``, ``finished`` or ``failed`` with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvstacks_controller.command import CommandError
from kvstacks_controller.registry import Worker

log = logging.getLogger("kvstacks.controller")


@dataclass
class Event:
    event_id: str
    command: str
    status: str = "pending"  # pending | finished | failed
    reason: str = ""
    #: HTTP status a failure maps to (4xx refused, 502/504 worker trouble).
    code: int = 0
    result: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event_id": self.event_id, "status": self.status, "command": self.command}
        if self.reason:
            out["reason"] = self.reason
        if self.result:
            out["result"] = self.result
        return out


class WorkerCallError(Exception):
    """A worker refused a command (``status`` 4xx) or could not be reached (502/504)."""

    def __init__(self, worker: Worker, status: int, reason: str) -> None:
        super().__init__(f"worker {worker.instance_id}/{worker.worker_id}: {reason}")
        self.status = status


class Executor:
    def __init__(
        self, timeout: float = 10.0, max_events: int = 10_000, worker_token: str | None = None
    ) -> None:
        self.timeout = timeout
        self.max_events = max_events
        self.worker_token = worker_token
        self.events: OrderedDict[str, Event] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None

    # ---------------------------------------------------------------- events

    def new_event(self, command: str) -> Event:
        event = Event(f"evt_{secrets.token_hex(8)}", command)
        self.events[event.event_id] = event
        while len(self.events) > self.max_events:
            # Forget the oldest finished event; pending ones stay until they end.
            for old_id, old in self.events.items():
                if old.status != "pending":
                    del self.events[old_id]
                    break
            else:
                break
        return event

    def finished(self, command: str, result: dict[str, Any]) -> Event:
        event = self.new_event(command)
        event.status, event.result, event.finished = "finished", result, time.time()
        return event

    def get(self, event_id: str) -> Event | None:
        return self.events.get(event_id)

    @property
    def pending(self) -> int:
        return sum(1 for e in self.events.values() if e.status == "pending")

    async def execute(self, command: str, work: Awaitable[dict[str, Any]], wait: float) -> Event:
        """Run ``work`` as an event; wait up to ``wait`` seconds for it to end."""
        event = self.new_event(command)
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if event.status != "pending":
                return
            event.finished = time.time()
            if t.cancelled():
                event.status, event.reason, event.code = "failed", "cancelled (controller shutting down)", 503
            elif t.exception() is not None:
                exc = t.exception()
                event.status = "failed"
                event.reason = (
                    exc.message if isinstance(exc, CommandError) else str(exc) or type(exc).__name__
                )
                event.code = getattr(exc, "status", 500)
                if not isinstance(exc, (CommandError, WorkerCallError)):
                    log.error("event %s (%s) failed", event.event_id, command, exc_info=exc)
            else:
                event.status, event.result = "finished", t.result()

        task.add_done_callback(done)
        if wait > 0:
            await asyncio.wait({task}, timeout=wait)
        if task.done():
            done(task)  # the callback may not have run yet
        return event

    # ---------------------------------------------------------------- calls to workers

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False)
        return self._client

    async def call(
        self, worker: Worker, op: str, args: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """POST one command to a worker agent; raise WorkerCallError with a reason on failure."""
        timeout = self.timeout if timeout is None else timeout
        headers = {"Authorization": f"Bearer {self.worker_token}"} if self.worker_token else {}
        url = f"http://{worker.address}/command"
        try:
            response = await self.client().post(
                url, json={"op": op, "args": args}, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException:
            raise WorkerCallError(worker, 504, f"did not answer {op!r} within {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise WorkerCallError(
                worker, 502, f"unreachable at {worker.address} ({type(exc).__name__}: {exc})"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if response.status_code >= 400:
            reason = data.get("error") or f"HTTP {response.status_code}"
            status = response.status_code if response.status_code < 500 else 502
            raise WorkerCallError(worker, status, str(reason))
        return data

    async def fan_out(
        self, workers: list[Worker], op: str, args: dict[str, Any], timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Send one command to several workers at once; the first failure (by worker id) is raised."""
        results = await asyncio.gather(
            *(self.call(w, op, args, timeout) for w in workers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
