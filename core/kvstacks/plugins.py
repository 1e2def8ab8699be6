"""The one plugin manager, and the registry of what plugins provide.

Builtin plugins are registered exactly as installed ones: modules of
``@hookimpl`` functions. Then every ``kvstacks`` entry point loads, unless
``KVSTACKS_LOAD_PLUGINS`` (a comma list of entry point names, empty for none)
says otherwise.

One broken plugin never takes the others down: a plugin that fails to import,
implements a hook that does not exist, registers a class that is not what its
hook asks for, or raises from a registration hook is skipped, logged once with
its distribution's name, and listed by ``kvstacks plugins`` with the reason. An
installed plugin's observer hook (``chunks_admitted``, ...) that raises is
logged once and ignored (a ``ConfigError`` from ``kvstacks_startup`` still
stops the engine: that is a deliberate refusal).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from kvstacks import hookspecs
from kvstacks.errors import ConfigError, PluginError
from kvstacks.registration import check_class

log = logging.getLogger("kvstacks.plugins")

DEFAULT_PLUGINS = (
    "kvstacks.builtin.compressors",
    "kvstacks.builtin.eviction",
    "kvstacks.builtin.transfer",
    "kvstacks.builtin.p2p",
    "kvstacks.builtin.agent",
)

#: kind -> the hook that registers it
KINDS = {
    "backends": "register_backends",
    "eviction_policies": "register_eviction_policies",
    "compressors": "register_compressors",
    "commands": "register_commands",
    "transfer_channels": "register_transfer_channels",
}

KIND_LABELS = {
    "backends": "backend", "eviction_policies": "eviction policy", "compressors": "compressor",
    "commands": "controller command", "transfer_channels": "transfer channel",
}

#: Hooks whose failure only loses that plugin's reaction, never the caller's operation.
OBSERVER_HOOKS = ("kvstacks_startup", "kvstacks_shutdown", "chunks_admitted", "chunks_evicted")

HOOK_NAMES = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "kvstacks_spec"))

pm = pluggy.PluginManager("kvstacks")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginFailure:
    entry_point: str
    distribution: str
    error: str


failures: list[PluginFailure] = []
#: Entry points installed but left out by KVSTACKS_LOAD_PLUGINS: name -> distribution.
not_loaded: dict[str, str] = {}


def _fail(plugin_name: str, dist: str, error: str, plugin: object | None = None) -> None:
    """Record a broken plugin once, log it once, and unregister it so none of its hooks run."""
    if plugin is not None and pm.is_registered(plugin):
        pm.unregister(plugin)
    if any(f.entry_point == plugin_name for f in failures):
        return
    failures.append(PluginFailure(plugin_name, dist, error))
    log.warning("plugin %r from distribution %s is skipped: %s", plugin_name, dist, error)


def _unknown_hooks(plugin: object) -> list[str]:
    """Hook names ``plugin`` implements that no hookspec declares (a misspelling, usually)."""
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None:
            close = difflib.get_close_matches(caller.name, HOOK_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"hooks are: {', '.join(HOOK_NAMES)}"
            problems.append(f"implements unknown hook {caller.name!r}; {hint}")
    return problems


def _guard_observers(plugin: object, plugin_name: str) -> None:
    """Make ``plugin``'s observer hooks log their first failure and return, instead of raising into the engine."""
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.name not in OBSERVER_HOOKS:
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                impl.function = _guarded(impl.function, plugin_name, caller.name)


def _guarded(function: Callable[..., Any], plugin_name: str, hook_name: str) -> Callable[..., Any]:
    reported = False

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal reported
        try:
            return function(*args, **kwargs)
        except ConfigError:
            raise  # a deliberate refusal of the engine's config (say, its controller section)
        except Exception:
            if not reported:
                reported = True
                dist, _ = distribution_of(plugin_name)
                log.exception("plugin %r (distribution %s) raised in %s; ignored (logged once)",
                              plugin_name, dist, hook_name)
            return None

    return call


def register_plugin(plugin: object, name: str, dist: str | None = None, guard: bool = True) -> bool:
    """Register one plugin in isolation: a bad one is recorded as a failure, not raised."""
    dist = dist or distribution_of(name)[0]
    try:
        pm.register(plugin, name=name)
    except Exception as exc:
        _fail(name, dist, f"{type(exc).__name__}: {exc}")
        return False
    problems = _unknown_hooks(plugin)
    if problems:
        _fail(name, dist, "; ".join(problems), plugin)
        return False
    if guard:
        _guard_observers(plugin, name)
    return True


def _load_builtins() -> None:
    for name in DEFAULT_PLUGINS:
        register_plugin(importlib.import_module(name), name, "kvstacks", guard=False)


def _load_entry_points() -> None:
    allowed = os.environ.get("KVSTACKS_LOAD_PLUGINS")
    wanted = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    installed: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group="kvstacks"):
        dist = ep.dist.name if ep.dist is not None else "?"
        installed[ep.name] = dist
        if wanted is not None and ep.name not in wanted:
            not_loaded[ep.name] = dist
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            _fail(ep.name, dist, f"{type(exc).__name__}: {exc}")
            continue
        _distributions[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")
        register_plugin(plugin, ep.name, dist)
    for name in sorted((wanted or set()) - set(installed)):
        log.warning("KVSTACKS_LOAD_PLUGINS names %r, which no installed distribution provides; installed plugins: %s",
                    name, ", ".join(sorted(installed)) or "none")


_distributions: dict[str, tuple[str, str]] = {}
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register builtins and entry points once; return the plugin manager."""
    global _loaded
    if not _loaded:
        _loaded = True
        _load_builtins()
        _load_entry_points()
        pm.check_pending()
    return pm


def distribution_of(plugin_name: str) -> tuple[str, str]:
    """``(distribution, version)`` of a registered plugin."""
    if plugin_name in _distributions:
        return _distributions[plugin_name]
    if plugin_name.startswith("kvstacks."):
        return "kvstacks", _version("kvstacks")
    return "(registered at runtime)", ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass
class Registration:
    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    entries: dict[str, dict[str, Registration]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def get(self, kind: str, name: str) -> type:
        return self.entries[kind][name].cls

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def __contains__(self, item: tuple[str, str]) -> bool:
        kind, name = item
        return name in self.entries[kind]

    def create(self, kind: str, name: str, options: Any = None) -> Any:
        cls = self.get(kind, name)
        return cls(options) if options is not None else cls()


class _BrokenPlugin(Exception):
    def __init__(self, plugin: object, plugin_name: str, dist: str, error: str) -> None:
        super().__init__(error)
        self.plugin, self.plugin_name, self.dist, self.error = plugin, plugin_name, dist, error


def _registrations_of(plugin: object, plugin_name: str, dist: str, version: str) -> list[Registration]:
    """Call one plugin's registration hooks and check each class it registers."""
    found: list[Registration] = []
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue

            def register(cls: type, *, _kind: str = kind) -> None:
                try:
                    check_class(_kind, cls)
                except TypeError as exc:
                    raise _BrokenPlugin(plugin, plugin_name, dist,
                                        f"registered a bad {KIND_LABELS[_kind]}: {exc}") from None
                if any(r.kind == _kind and r.cls is cls for r in found):
                    raise _BrokenPlugin(plugin, plugin_name, dist,
                                        f"registered {cls.__qualname__} twice as a {KIND_LABELS[_kind]}; "
                                        "call register once per class")
                found.append(Registration(_kind, cls.name, cls, plugin_name, dist, version))

            try:
                impl.function(register=register)
            except _BrokenPlugin:
                raise
            except Exception as exc:
                raise _BrokenPlugin(plugin, plugin_name, dist,
                                    f"{hook_name} raised {type(exc).__name__}: {exc}") from None
    return found


def registry() -> Registry:
    """Ask every plugin's registration hooks, attributing each class to its plugin.

    A plugin whose registrations are broken is skipped (see the module docstring);
    two plugins claiming one name is a ``PluginError`` naming both.
    """
    load_plugins()
    reg = Registry()
    for plugin in pm.get_plugins():
        plugin_name = pm.get_name(plugin) or repr(plugin)
        dist, version = distribution_of(plugin_name)
        try:
            found = _registrations_of(plugin, plugin_name, dist, version)
        except _BrokenPlugin as broken:
            _fail(broken.plugin_name, broken.dist, broken.error, broken.plugin)
            continue
        for entry in found:
            existing = reg.entries[entry.kind].get(entry.name)
            if existing is not None and existing.cls is not entry.cls:
                first, second = sorted([existing, entry], key=lambda r: r.plugin)
                raise PluginError(
                    f"two plugins register the {KIND_LABELS[entry.kind]} {entry.name!r}: "
                    f"{first.distribution} (plugin {first.plugin}) and {second.distribution} (plugin {second.plugin}); "
                    "uninstall one, or limit what loads with KVSTACKS_LOAD_PLUGINS"
                )
            reg.entries[entry.kind][entry.name] = entry
    return reg


def add_cli_commands(cli: Any) -> None:
    """Let each plugin add its subcommands; one that raises is skipped like any broken plugin."""
    load_plugins()
    for impl in pm.hook.register_cli_commands.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            impl.function(cli=cli)
        except Exception as exc:
            _fail(plugin_name, distribution_of(plugin_name)[0],
                  f"register_cli_commands raised {type(exc).__name__}: {exc}", impl.plugin)


def describe() -> list[dict[str, Any]]:
    """Every loaded plugin, its distribution and version, and what it registered."""
    reg = registry()
    plugins: dict[str, dict[str, Any]] = {}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist, version = distribution_of(name)
        plugins[name] = {"name": name, "distribution": dist, "version": version,
                         "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                         "registers": {}}
    for kind, entries in reg.entries.items():
        for entry in entries.values():
            plugins[entry.plugin]["registers"].setdefault(kind, []).append(entry.name)
    for failure in failures:
        plugins[failure.entry_point] = {"name": failure.entry_point, "distribution": failure.distribution,
                                        "version": _version(failure.distribution), "hooks": [],
                                        "registers": {}, "error": failure.error}
    return sorted(plugins.values(), key=lambda p: p["name"])
