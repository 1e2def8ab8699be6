"""Every hook a kvstacks plugin can implement.

This module is the reference for the hooks: each docstring says when the hook is
called, what it receives and what it must do. ``docs/hooks.md`` documents each of
them for plugin authors (a test checks that it does).

Registration hooks receive a ``register`` callable. Call it once per class the
plugin provides. Every registrable class declares:

- ``name``: the name users write in YAML (``backend: cpu``, ``compressor: lz4``);
- ``Options``: optionally, a dataclass whose fields are the options that class
  accepts; kvstacks validates YAML against it and reports errors by YAML path;
- and it is its own factory: kvstacks calls ``cls(options)`` (or ``cls()`` when
  the class has no ``Options``).

Two plugins registering the same name for the same kind is an error that names
both distributions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("kvstacks")
hookimpl = pluggy.HookimplMarker("kvstacks")

Register = Callable[[type], None]


@hookspec
def register_backends(register: Register) -> None:
    """Register tier backends: subclasses of :class:`kvstacks.backend.Backend`.

    A backend stores :class:`kvstacks.memory.MemoryObj` values under
    :class:`kvstacks.keys.CacheKey` keys. It is built with ``cls(options)`` where
    ``options`` is an instance of ``cls.Options`` filled from the tier's YAML entry
    (every key of the entry but ``backend``, ``name``, ``capacity``, ``eviction``,
    ``eviction_options``, ``compressor``, ``compressor_options`` and ``lossless``,
    which the tier itself handles). A ``ConfigError`` raised by the constructor or
    by ``start()`` names the option relative to the tier entry (``"path"``); the
    engine prefixes the tier's YAML path.
    """


@hookspec
def register_eviction_policies(register: Register) -> None:
    """Register eviction policies: subclasses of :class:`kvstacks.eviction.EvictionPolicy`.

    A policy is told of inserts, accesses and removals and yields victims when a
    tier needs room. Every operation must be O(1). Pinned keys are removed from
    the policy while pinned, so a policy never sees them as candidates.
    """


@hookspec
def register_compressors(register: Register) -> None:
    """Register compressors: subclasses of :class:`kvstacks.compression.Compressor`.

    A compressor turns a KV tensor ``[2, layers, tokens, hidden]`` into bytes and
    back. It declares ``lossless``; a tier configured ``lossless: true`` refuses a
    lossy compressor at config time. Decoding bytes it did not produce must raise
    :class:`kvstacks.errors.CorruptChunk`, never crash or hang.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register controller commands (used by ``kvstacks-controller``).

    Runs wherever plugins load, also without ``kvstacks-controller`` installed: import
    ``from kvstacks_controller import Command, CommandError`` inside the hook, not at
    module level. A command class (a ``kvstacks_controller.Command``) declares ``name``
    (the route is ``/<name>``), ``methods`` (default ``("POST",)``), ``auth``
    (``"admin"``, the default, needs ``KVSTACKS_ADMIN_TOKEN`` when set; ``"worker"``
    needs ``KVSTACKS_WORKER_TOKEN``; ``"public"`` needs nothing; or a mapping from
    method to level), ``mutating`` (documentation, shown in the OpenAPI document),
    ``request_schema``/``response_schema`` (JSON Schema, validated and published),
    and an async ``run(self, ctx, body)`` returning a JSON-able dict, where ``ctx``
    is the controller's context (index, registry, executor). A third-party command
    registered here gets a route with no change to the controller.
    """


@hookspec
def register_transfer_channels(register: Register) -> None:
    """Register transfer channels: how chunks move between instances.

    A channel class subclasses :class:`kvstacks.transfer.TransferChannel`:
    ``listen(host, port, receive, token) -> address`` opens the receiving side on
    a worker, and ``send(address, objs, meta, timeout, token)`` ships
    :class:`kvstacks.memory.MemoryObj` values there and returns the receiver's
    answer (what it stored), so a move removes the source only after the
    destination confirmed. Chunks travel in the :mod:`kvstacks.frame` format.
    The builtin channel is ``tcp``; ``kvstacks-nixl`` adds ``nixl``. A channel's
    ``preference`` orders what workers advertise, so moves and P2P pulls use the
    most preferred channel both sides have.
    """


@hookspec
def register_cli_commands(cli: Any) -> None:
    """Add subcommands to the ``kvstacks`` command line.

    ``cli`` is the root :class:`click.Group`; decorate functions with
    ``@cli.command()`` or call ``cli.add_command(...)``.
    """


@hookspec
def kvstacks_startup(engine: Any) -> None:
    """Called once when a :class:`kvstacks.CacheEngine` has built its tiers.

    Off the hot path; use it to start background work tied to an engine.
    """


@hookspec
def kvstacks_shutdown(engine: Any) -> None:
    """Called once when an engine closes, after pending offloads have drained."""


@hookspec
def chunks_admitted(engine: Any, tier: str, keys: list) -> None:
    """A batch of chunks (``CacheKey`` list) became present in ``tier``.

    Called in batches, outside the caller's critical path where possible. Must
    not block: hand the work to a queue.
    """


@hookspec
def chunks_evicted(engine: Any, tier: str, keys: list) -> None:
    """A batch of chunks (``CacheKey`` list) left ``tier`` (evicted, removed or cleared)."""
