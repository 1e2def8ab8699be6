"""Skipping on missing dependencies (but never in CI), free loopback ports, and waiting for a condition."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import pytest


def in_ci() -> bool:
    """True when ``CI=true``: missing dependencies are then failures, not skips."""
    return os.environ.get("CI", "").strip().lower() == "true"


def _missing(message: str) -> None:
    if in_ci():
        pytest.fail(f"{message} (CI=true: every dependency must be installed in CI)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module_name: str, hint: str = "") -> ModuleType:
    """Import ``module_name`` and return it; skip the test when it is missing, fail when ``CI=true``.

    ``hint`` says how to install it, e.g. ``"pip install kvstacks-redis"``.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        _missing(f"{module_name} is not importable ({exc})" + (f"; {hint}" if hint else ""))
        raise  # unreachable: skip/fail raise


def require_executable(name: str, hint: str = "") -> str:
    """The path of program ``name`` on ``PATH``; skip when missing, fail when ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not on PATH" + (f"; {hint}" if hint else ""))
    return path  # type: ignore[return-value]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 15.0, *, interval: float = 0.05,
             retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something true, and return that.

    An exception of a type in ``retry_on`` (a server not answering yet) counts as not yet.
    After ``timeout`` seconds: ``AssertionError`` naming ``what`` and the last answer or error,
    which is what a failing test needs to say.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except retry_on as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
