"""The plugin manager against real (tiny) distributions put on sys.path in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def make_dist(root: Path, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kvstacks]\n{ep_name or module} = {module}\n")


BACKEND = """
    from kvstacks import hookimpl
    from kvstacks.backend import Backend

    class B(Backend):
        name = "dup"

        async def put(self, key, obj): ...
        async def get(self, key): ...
        async def contains(self, key): ...
        async def remove(self, key): ...

    @hookimpl
    def register_backends(register):
        register(B)
"""


def kvstacks(args: list[str], path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(path), **env)
    return subprocess.run([sys.executable, "-c", "from kvstacks.cli import main; main()", *args],
                          env=environ, capture_output=True, text=True, timeout=120)


def test_broken_plugin_is_reported_by_distribution_and_others_still_load(tmp_path):
    make_dist(tmp_path, "kvstacks-broken", "kvstacks_broken", "raise ImportError('needs libfoo')")
    make_dist(tmp_path, "kvstacks-fine", "kvstacks_fine", BACKEND)
    result = kvstacks(["plugins", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert "needs libfoo" in plugins["kvstacks_broken"]["error"]
    assert plugins["kvstacks_broken"]["distribution"] == "kvstacks-broken"
    assert plugins["kvstacks_fine"]["registers"] == {"backends": ["dup"]}
    assert "kvstacks-broken" in result.stderr  # logged too


def test_two_plugins_with_one_name_is_an_error_naming_both(tmp_path):
    make_dist(tmp_path, "kvstacks-one", "kvstacks_one", BACKEND)
    make_dist(tmp_path, "kvstacks-two", "kvstacks_two", BACKEND)
    result = kvstacks(["plugins"], tmp_path)
    assert result.returncode != 0
    assert "kvstacks-one" in result.stderr and "kvstacks-two" in result.stderr and "'dup'" in result.stderr
    assert result.stderr.startswith("Error: two plugins register the backend 'dup'"), result.stderr


def test_load_plugins_env_limits_entry_points(tmp_path):
    make_dist(tmp_path, "kvstacks-one", "kvstacks_one", BACKEND)
    make_dist(tmp_path, "kvstacks-two", "kvstacks_two", BACKEND)
    result = kvstacks(["plugins", "--json"], tmp_path, KVSTACKS_LOAD_PLUGINS="kvstacks_one")
    assert result.returncode == 0, result.stderr
    names = {p["name"] for p in json.loads(result.stdout)}
    assert "kvstacks_one" in names and "kvstacks_two" not in names
    result = kvstacks(["plugins", "--json"], tmp_path, KVSTACKS_LOAD_PLUGINS="")
    names = {p["name"] for p in json.loads(result.stdout)}
    assert not any(n.startswith("kvstacks_") for n in names)
    assert "kvstacks.builtin.eviction" in names  # builtins always load


def test_builtins_register_like_plugins():
    from kvstacks.plugins import registry

    reg = registry()
    assert {"lru", "lfu", "fifo", "s3fifo"} <= set(reg.names("eviction_policies"))
    assert {"none", "lz4"} <= set(reg.names("compressors"))
    assert reg.entries["eviction_policies"]["lru"].distribution == "kvstacks"


def test_check_command_reports_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stack:\n  - backend: nope\n")
    result = kvstacks(["check", str(bad)], tmp_path)
    assert result.returncode != 0
    assert "stack[0].backend: 'nope' is not installed" in result.stderr
    assert "Traceback" not in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("stack:\n  - backend: cpu\n    capacity: 1GiB\n")
    result = kvstacks(["check", str(good)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "cpu" in result.stdout and "1.0 GiB" in result.stdout


@pytest.mark.parametrize("value, expected", [("8GiB", 8 << 30), ("500 MB", 500_000_000), (1024, 1024), ("1.5KiB", 1536)])
def test_sizes(value, expected):
    from kvstacks.sizes import parse_size

    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GiB", "8 GiBs", True, -5])
def test_bad_sizes_say_what_is_accepted(value):
    from kvstacks.sizes import parse_size

    with pytest.raises(ValueError, match="size|negative"):
        parse_size(value)


MISSPELLED = """
    from kvstacks import hookimpl

    @hookimpl
    def register_backend(register):
        pass
"""

RAISES = """
    from kvstacks import hookimpl

    @hookimpl
    def register_backends(register):
        raise RuntimeError("cannot find libbar")
"""

STACK = "stack:\n  - backend: dup\n    capacity: 1MiB\n"


OBSERVER = """
    from kvstacks import hookimpl

    @hookimpl
    def chunks_admitted(engine, tier, keys):
        raise RuntimeError("observer broke")

    @hookimpl
    def register_cli_commands(cli):
        raise RuntimeError("cli broke")
"""

ENGINE = """
import torch
from kvstacks import CacheEngine
CacheEngine.from_config({"chunk_size": 4, "stack": [{"backend": "dup", "capacity": "1MiB"}]}).close()
engine = CacheEngine.from_config({"chunk_size": 4, "stack": [{"backend": "cpu", "capacity": "1MiB"}]})
for i in range(3):
    engine.store(list(range(i, i + 8)), torch.ones(2, 1, 8, 4, dtype=torch.float16))
print("stored", engine.lookup(list(range(8))))
engine.close()
"""


def test_broken_plugins_are_skipped_and_named_while_the_rest_works(tmp_path):
    make_dist(tmp_path, "kvstacks-misspelled", "kvstacks_misspelled", MISSPELLED)
    make_dist(tmp_path, "kvstacks-raises", "kvstacks_raises", RAISES)
    make_dist(tmp_path, "kvstacks-observer", "kvstacks_observer", OBSERVER)
    make_dist(tmp_path, "kvstacks-fine", "kvstacks_fine", BACKEND)
    result = kvstacks(["--help"], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "kvstacks-observer" in result.stderr and "register_cli_commands raised RuntimeError: cli broke" in result.stderr
    result = kvstacks(["plugins", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    for name, dist, reason in [
        ("kvstacks_misspelled", "kvstacks-misspelled",
         "implements unknown hook 'register_backend'; did you mean 'register_backends'?"),
        ("kvstacks_raises", "kvstacks-raises", "register_backends raised RuntimeError: cannot find libbar"),
    ]:
        assert reason in plugins[name]["error"]
        assert plugins[name]["distribution"] == dist
        assert result.stderr.count(dist) == 1, result.stderr  # logged once
    assert plugins["kvstacks_fine"]["registers"] == {"backends": ["dup"]}
    # Every CacheEngine still starts, and an observer hook that raises costs only its own reaction.
    environ = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", ENGINE], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stored 8" in result.stdout
    assert result.stderr.count("raised in chunks_admitted; ignored (logged once)") == 1, result.stderr


def test_load_plugins_env_tells_unknown_from_installed_but_not_loaded(tmp_path):
    make_dist(tmp_path, "kvstacks-one", "kvstacks_one", BACKEND, ep_name="dup")
    (tmp_path / "s.yaml").write_text(STACK)
    result = kvstacks(["check", str(tmp_path / "s.yaml")], tmp_path, KVSTACKS_LOAD_PLUGINS="kvstacks_onr")
    assert result.returncode != 0
    assert "KVSTACKS_LOAD_PLUGINS names 'kvstacks_onr', which no installed distribution provides" in result.stderr
    assert ("stack[0].backend: 'dup' is installed (kvstacks-one, plugin dup) but not loaded: "
            "KVSTACKS_LOAD_PLUGINS does not name dup") in result.stderr
