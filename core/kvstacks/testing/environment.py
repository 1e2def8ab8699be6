"""Skipping on missing dependencies (but never in CI), and free loopback ports."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from types import ModuleType

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
