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


@pytest.mark.parametrize("method", ["batch_put", "batch_get", "batch_contains"])
def test_batch_method_signatures_are_documented_as_the_code_has_them(method):
    from kvstacks.backend import Backend

    signature = inspect.signature(getattr(Backend, method))
    params = ", ".join(p.name if p.annotation is p.empty else f"{p.name}: {p.annotation}"
                       for p in signature.parameters.values())
    documented = f"async def {method}({params}) -> {signature.return_annotation}"
    assert documented in (DOCS / "plugin-authors.md").read_text()


def test_one_import_path_for_command_classes():
    """Docs and hookspecs teach ``from kvstacks_controller import ...``, imported inside the hook."""
    texts = {p.name: p.read_text() for p in DOCS.glob("*.md")}
    texts["hookspecs.py"] = pathlib.Path(hookspecs.__file__).read_text()
    for name, text in texts.items():
        assert "kvstacks_controller.command." not in text, name
    for name in ("plugin-authors.md", "hooks.md", "hookspecs.py"):
        assert "from kvstacks_controller import Command, CommandError" in texts[name], name
    assert "also without `kvstacks-controller` installed" in texts["hooks.md"]


def test_plugin_guide_answers_capacity_and_event_id():
    text = (DOCS / "plugin-authors.md").read_text()
    assert "A policy is not told its tier's capacity" in text
    assert "Nothing is added to it, `event_id` included" in text


def test_no_distribution_depends_on_aiofiles_without_importing_it():
    """aiofiles was declared by core and disk but used only by a benchmark (the disk tier measured it slower)."""
    import tomllib

    root = DOCS.parent
    for pyproject in [root / "core" / "pyproject.toml", *root.glob("plugins/*/pyproject.toml"),
                      *root.glob("contrib/*/pyproject.toml"), root / "controller" / "pyproject.toml"]:
        deps = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
        if any(d.replace(" ", "").startswith("aiofiles") for d in deps):
            sources = "".join(p.read_text() for p in pyproject.parent.rglob("*.py"))
            assert "import aiofiles" in sources, f"{pyproject.parent.name} declares aiofiles but never imports it"
