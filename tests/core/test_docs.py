import inspect
import pathlib

import pytest

from kvstacks import hookspecs

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "kvstacks_spec")]


def test_there_are_hooks():
    assert "register_backends" in HOOKS and len(HOOKS) >= 10


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    text = (DOCS / "hooks.md").read_text()
    assert f"### `{hook}(" in text, f"docs/hooks.md has no section for {hook}"
    assert inspect.getdoc(getattr(hookspecs, hook)), f"{hook} has no docstring in hookspecs.py"
