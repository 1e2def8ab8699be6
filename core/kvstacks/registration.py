"""What a registered class must be, checked when ``register`` is called.

A plugin's mistakes (a policy registered as a backend, an ``Options`` that is
not a dataclass, a ``def`` where the engine awaits, a method left out) would
otherwise surface much later as an unrelated error, or as chunks silently lost.
``check_class`` says what is wrong and how to fix it; the plugin manager adds
the distribution's name.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from kvstacks.backend import Backend, InProcessBackend
from kvstacks.compression import Compressor
from kvstacks.eviction import EvictionPolicy
from kvstacks.transfer import TransferChannel

#: kind -> (base class, import path shown in errors); commands have no base in core.
BASES: dict[str, tuple[type, str]] = {
    "backends": (Backend, "kvstacks.backend.Backend"),
    "eviction_policies": (EvictionPolicy, "kvstacks.eviction.EvictionPolicy"),
    "compressors": (Compressor, "kvstacks.compression.Compressor"),
    "transfer_channels": (TransferChannel, "kvstacks.transfer.TransferChannel"),
}

#: Methods a subclass of each base must define (the base's own only raise NotImplementedError).
REQUIRED: dict[type, tuple[str, ...]] = {
    Backend: ("put", "get", "contains", "remove"),
    InProcessBackend: ("put_now", "get_now", "contains_now", "remove_now", "keys_now"),
    EvictionPolicy: ("insert", "access", "remove", "pop_victim", "__len__", "__contains__"),
    Compressor: ("compress", "decompress"),
    TransferChannel: ("listen", "send"),
}


def _is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


def check_class(kind: str, cls: Any) -> None:
    """Raise ``TypeError`` saying what is wrong with ``cls`` as a ``kind`` and how to fix it."""
    if not isinstance(cls, type):
        raise TypeError(f"register() takes a class, got {cls!r}; pass the class itself, not an instance")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} has no 'name'; set a class attribute such as name = \"mytier\"")
    options = getattr(cls, "Options", None)
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"{cls.__qualname__}.Options is not a dataclass; decorate it with @dataclasses.dataclass")
    if kind == "commands":
        run = getattr(cls, "run", None)
        if run is None or not inspect.iscoroutinefunction(run):
            raise TypeError(f"{cls.__qualname__}.run must be 'async def run(self, ctx, body)'")
        return
    base, base_path = BASES[kind]
    if not issubclass(cls, base):
        actual = [path for other, path in BASES.values() if issubclass(cls, other)]
        what = f" (it is a {actual[0]})" if actual else ""
        raise TypeError(f"{cls.__qualname__} is registered as one of the {kind.replace('_', ' ')} but does not "
                        f"subclass {base_path}{what}; register it with the hook for its kind, or subclass {base_path}")
    missing = [
        method
        for required_base, methods in REQUIRED.items()
        if issubclass(cls, required_base)
        for method in methods
        if getattr(cls, method) is getattr(required_base, method)
    ]
    if missing:
        raise TypeError(f"{cls.__qualname__} does not implement {', '.join(missing)}; "
                        f"every {base_path} subclass must define them")
    for attr, expected in inspect.getmembers(base, _is_async):
        actual = getattr(cls, attr)
        if actual is not expected and not _is_async(actual):
            raise TypeError(f"{cls.__qualname__}.{attr} must be 'async def': the engine awaits it")
