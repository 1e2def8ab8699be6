"""The one plugin manager, and the registry of what plugins provide.

Builtin plugins are registered exactly as installed ones: modules of
``@hookimpl`` functions. Then every ``kvstacks`` entry point loads, unless
``KVSTACKS_LOAD_PLUGINS`` (a comma list of entry point names, empty for none)
says otherwise. A plugin that fails to import is logged with its distribution
name and the others still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from kvstacks import hookspecs
from kvstacks.errors import PluginError

log = logging.getLogger("kvstacks.plugins")

DEFAULT_PLUGINS = (
    "kvstacks.builtin.compressors",
    "kvstacks.builtin.eviction",
    "kvstacks.builtin.transfer",
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

pm = pluggy.PluginManager("kvstacks")
pm.add_hookspecs(hookspecs)


@dataclass
class PluginFailure:
    entry_point: str
    distribution: str
    error: str


failures: list[PluginFailure] = []


def _load_builtins() -> None:
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)


def _load_entry_points() -> None:
    allowed = os.environ.get("KVSTACKS_LOAD_PLUGINS")
    wanted = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group="kvstacks"):
        if wanted is not None and ep.name not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            log.warning("plugin %r from distribution %s failed to load: %s", ep.name, dist, exc)
            continue
        pm.register(plugin, name=ep.name)
        _distributions[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")


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


def registry() -> Registry:
    """Ask every plugin's registration hooks, attributing each class to its plugin."""
    load_plugins()
    reg = Registry()
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
            dist, version = distribution_of(plugin_name)

            def register(cls: type, *, _kind: str = kind, _plugin: str = plugin_name,
                         _dist: str = dist, _version: str = version) -> None:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{_dist} (plugin {_plugin}) registered {cls!r} without a 'name'")
                existing = reg.entries[_kind].get(name)
                if existing is not None and existing.cls is not cls:
                    raise PluginError(
                        f"two plugins register the {KIND_LABELS[_kind]} {name!r}: "
                        f"{existing.distribution} (plugin {existing.plugin}) and {_dist} (plugin {_plugin}); "
                        "uninstall one, or limit what loads with KVSTACKS_LOAD_PLUGINS"
                    )
                reg.entries[_kind][name] = Registration(_kind, name, cls, _plugin, _dist, _version)

            impl.function(register=register)
    return reg


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
