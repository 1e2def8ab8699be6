"""Stack configuration: YAML in, validated dataclasses out, errors by YAML path."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kvstacks.errors import ConfigError
from kvstacks.sizes import parse_size


class Size(int):
    """An ``Options`` field of this type accepts sizes such as ``8GiB``."""


#: Which distribution provides each first-party backend, for "pip install ..." hints.
KNOWN_DISTRIBUTIONS = {
    "cpu": "kvstacks-cpu", "disk": "kvstacks-disk", "redis": "kvstacks-redis",
    "mooncake": "kvstacks-mooncake", "nixl": "kvstacks-nixl", "cachegen": "kvstacks-cachegen",
}

TIER_KEYS = ("backend", "name", "capacity", "eviction", "eviction_options", "compressor", "compressor_options", "lossless")


#: Longest chunk, in tokens: beyond it a value is a typo (1e11), not a tuning.
MAX_CHUNK_SIZE = 1 << 20


@dataclass
class TierConfig:
    backend: str
    name: str
    capacity: int | None
    eviction: str
    eviction_options: Any
    compressor: str
    compressor_options: Any
    lossless: bool
    backend_options: Any
    path: str  # where in the YAML, for errors at runtime


#: The offload queue's byte budget when neither the YAML nor the top tier's capacity sizes it.
DEFAULT_QUEUE_BYTES = 1 << 30
#: Bounds of the offload settings: beyond them a value is a typo, not a tuning.
MAX_OFFLOAD_RETRIES = 100
MAX_OFFLOAD_WORKERS = 256
MAX_BACKOFF_S = 3600.0


@dataclass
class OffloadConfig:
    #: null: the top tier's capacity, at most 1 GiB (1 GiB when the top tier is unbounded)
    queue_bytes: Size | None = None
    when_full: Literal["drop", "wait"] = "drop"
    retries: int = 3
    backoff_s: float = 0.05
    workers: int = 2

    def __post_init__(self) -> None:
        # Always under the stack's top-level ``offload`` key, so the full YAML path is known here.
        if self.queue_bytes is not None and self.queue_bytes <= 0:
            raise ConfigError("offload.queue_bytes", f"must be a positive size such as 256MiB (or null to size it "
                                                     f"from the top tier), got {self.queue_bytes}")
        if not 0 <= self.retries <= MAX_OFFLOAD_RETRIES:
            raise ConfigError("offload.retries", f"must be between 0 (one try, no retry) and {MAX_OFFLOAD_RETRIES}, "
                                                 f"got {self.retries}")
        if not 0 <= self.backoff_s <= MAX_BACKOFF_S:  # also refuses nan
            raise ConfigError("offload.backoff_s", f"must be seconds between 0 and {MAX_BACKOFF_S:g}, got {self.backoff_s}")
        if not 1 <= self.workers <= MAX_OFFLOAD_WORKERS:
            raise ConfigError("offload.workers", f"must be between 1 and {MAX_OFFLOAD_WORKERS} writers per lower tier, "
                                                 f"got {self.workers}")

    def queue_budget(self, top_capacity: int | None) -> int:
        """The queue's byte budget: as configured, else sized from the top tier's capacity."""
        if self.queue_bytes is not None:
            return int(self.queue_bytes)
        if top_capacity is None:
            return DEFAULT_QUEUE_BYTES
        return max(1, min(DEFAULT_QUEUE_BYTES, top_capacity))


@dataclass
class StackConfig:
    model: str = "default"
    kv_format: str = "kv"
    world_size: int = 1
    rank: int = 0
    chunk_size: int = 256
    store_partial: bool = True
    salt: str = ""
    write_mode: Literal["through", "back"] = "through"
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    stack: list[TierConfig] = field(default_factory=list)
    controller: dict[str, Any] | None = None
    source: str = "<dict>"


def _type_name(tp: Any) -> str:
    if tp is Size:
        return "a size such as 8GiB"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Coerce one YAML value to a dataclass field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(path, " or ".join(errors))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"{value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return origin(convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is Size:
        try:
            return Size(parse_size(value))
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(path, f"expected a path, got {value!r}")
        return Path(os.path.expanduser(str(value)))
    if dataclasses.is_dataclass(tp):
        return build_options(tp, value, path)
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_options(options_cls: type, values: Mapping[str, Any] | None, path: str) -> Any:
    """Fill the dataclass ``options_cls`` from a mapping; unknown or bad keys raise ConfigError."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(path, f"expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{path}.{unknown[0]}" if path else unknown[0], f"unknown option; allowed here: {allowed}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in values:
            kwargs[name] = convert(values[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, "is required")
    try:
        return options_cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ names the option itself (``ghost_ratio``); say where it sits.
        raise under(path, exc) from None
    except (TypeError, ValueError) as exc:  # an Options.__post_init__ that refused a value
        raise ConfigError(path, str(exc)) from None


def under(path: str, exc: ConfigError) -> ConfigError:
    """``exc`` with ``path`` in front of its own path, unless it already names the full path."""
    if not path or exc.path == path or exc.path.startswith((f"{path}.", f"{path}[")):
        return exc
    return ConfigError(f"{path}.{exc.path}" if exc.path else path, exc.message)


def describe_options(options_cls: type) -> list[dict[str, str]]:
    """Options of a plugin class, for ``kvstacks plugins`` and docs."""
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory())
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": repr(default)})
    return out


def _install_hint(kind: str, name: str, installed: list[str]) -> str:
    from kvstacks.plugins import failures, not_loaded

    dist = KNOWN_DISTRIBUTIONS.get(name)
    available = f"; available {kind}: {', '.join(installed) or 'none'}"
    for entry_point, from_dist in not_loaded.items():
        if entry_point == name or from_dist == dist:
            return (f"{name!r} is installed ({from_dist}, plugin {entry_point}) but not loaded: "
                    f"KVSTACKS_LOAD_PLUGINS does not name {entry_point}; add it there{available}")
    for failure in failures:
        if failure.entry_point == name or failure.distribution == dist:
            return (f"{name!r} is installed ({failure.distribution}) but its plugin failed to load: "
                    f"{failure.error}; see 'kvstacks plugins'{available}")
    hint = f" (pip install {dist})" if dist else ""
    if not_loaded:
        left_out = ", ".join(f"{ep} ({d})" for ep, d in sorted(not_loaded.items()))
        hint += f"; KVSTACKS_LOAD_PLUGINS leaves out the installed plugins {left_out}"
    return f"{name!r} is not installed{hint}; installed {kind}: {', '.join(installed) or 'none'}"


def parse_stack(data: Any, source: str = "<dict>") -> StackConfig:
    """Validate a whole stack mapping against the installed plugins."""
    from kvstacks.plugins import registry

    if not isinstance(data, Mapping):
        raise ConfigError("", f"{source}: a stack config is a mapping with a 'stack' list, got {type(data).__name__}")
    reg = registry()
    top = dict(data)
    tiers_raw = top.pop("stack", None)
    controller = top.pop("controller", None)
    cfg = build_options(StackConfig, top, "")
    cfg.source = source
    if not 0 < cfg.chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError("chunk_size", f"must be a number of tokens from 1 to {MAX_CHUNK_SIZE}, got {cfg.chunk_size}"
                                        " (256 is the usual choice)")
    if cfg.world_size < 1:
        raise ConfigError("world_size", f"must be at least 1 (the number of ranks sharing a model), got {cfg.world_size}")
    if not 0 <= cfg.rank < cfg.world_size:
        raise ConfigError("rank", f"must be from 0 to world_size - 1 = {cfg.world_size - 1}, got {cfg.rank}")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError("stack", "must be a non-empty list of tiers, top (fastest) first, e.g. [{backend: cpu, capacity: 8GiB}]")
    if controller is not None and not isinstance(controller, Mapping):
        raise ConfigError("controller", "must be a mapping with url and instance_id")
    cfg.controller = dict(controller) if controller is not None else None
    if cfg.controller is not None:
        from kvstacks.agent import parse_options

        parse_options(cfg.controller)  # what the worker agent would refuse at engine start
    names: set[str] = set()
    claimed: dict[str, str] = {}
    for i, raw in enumerate(tiers_raw):
        path = f"stack[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"each tier is a mapping with at least 'backend', got {raw!r}")
        backend = raw.get("backend")
        if not isinstance(backend, str):
            raise ConfigError(f"{path}.backend", f"is required; installed backends: {', '.join(reg.names('backends')) or 'none'}")
        if ("backends", backend) not in reg:
            raise ConfigError(f"{path}.backend", _install_hint("backends", backend, reg.names("backends")))
        name = raw.get("name", backend)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}.name", f"must be a non-empty string, got {name!r}; it names the tier in "
                                              "stats, metrics and commands")
        if name in names:
            raise ConfigError(f"{path}.name", f"tier name {name!r} is used twice; give one of them a distinct 'name'")
        names.add(name)
        capacity = raw.get("capacity")
        if capacity is not None:
            capacity = convert(capacity, Size, f"{path}.capacity")
            if capacity <= 0:
                raise ConfigError(f"{path}.capacity", "must be a positive size such as 8GiB, or left out for no limit")
        eviction = raw.get("eviction", "lru")
        if ("eviction_policies", eviction) not in reg:
            raise ConfigError(f"{path}.eviction", _install_hint("eviction policies", eviction, reg.names("eviction_policies")))
        try:
            eviction_options = build_options(reg.get("eviction_policies", eviction).Options, raw.get("eviction_options"),
                                             f"{path}.eviction_options")
            compressor = raw.get("compressor", "none")
            if ("compressors", compressor) not in reg:
                raise ConfigError(f"{path}.compressor", _install_hint("compressors", compressor, reg.names("compressors")))
            lossless = convert(raw.get("lossless", False), bool, f"{path}.lossless")
            compressor_cls = reg.get("compressors", compressor)
            if lossless and not getattr(compressor_cls, "lossless", True):
                raise ConfigError(f"{path}.compressor", f"{compressor!r} is lossy but this tier is lossless: true; pick a lossless compressor or drop lossless")
            compressor_options = build_options(compressor_cls.Options, raw.get("compressor_options"), f"{path}.compressor_options")
            backend_cls = reg.get("backends", backend)
            rest = {k: v for k, v in raw.items() if k not in TIER_KEYS}
            backend_options = build_options(backend_cls.Options, rest, path)
            backend_cls.check_options(backend_options)
            # Policies and compressors check more in their constructors; building one has no side effects.
            _try_build(reg.get("eviction_policies", eviction), eviction_options, "eviction_options")
            _try_build(compressor_cls, compressor_options, "compressor_options")
            for claim in backend_cls.claims(backend_options):
                if claim in claimed:
                    raise ConfigError(path, f"{claimed[claim]} already uses {claim}; give each tier its own")
                claimed[claim] = path
        except ConfigError as exc:
            raise in_tier(path, exc) from None
        cfg.stack.append(TierConfig(backend, name, capacity, eviction, eviction_options, compressor, compressor_options,
                                    lossless, backend_options, path))
    return cfg


def _try_build(cls: type, options: Any, where: str) -> None:
    try:
        cls(options)
    except ConfigError as exc:
        raise under(where, exc) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from None


def in_tier(tier_path: str, exc: ConfigError) -> ConfigError:
    """Plugins name options relative to their tier entry (``compressor_options.level``); add the tier's path."""
    return under(tier_path, exc)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key; the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def load_yaml(path: str | os.PathLike[str]) -> StackConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse_stack(data, str(path))
