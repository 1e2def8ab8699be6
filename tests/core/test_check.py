"""``kvstacks check`` refuses, by YAML path, everything engine start would refuse, and no more side effects."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from kvstacks.cli import cli
from kvstacks.testing import require

CPU = "  - backend: cpu\n    capacity: 1MiB\n"

# (stack YAML, expected "path: message" fragment); {tmp} is a fresh directory.
CASES = {
    "disk path is a file": (CPU + "  - backend: disk\n    path: {tmp}/file\n",
                            "stack[1].path: {tmp}/file is not a directory"),
    "disk path missing, create false": (CPU + "  - backend: disk\n    path: {tmp}/none\n    create: false\n",
                                        "stack[1].path: {tmp}/none does not exist"),
    "disk parent not a directory": (CPU + "  - backend: disk\n    path: {tmp}/file/sub\n",
                                    "stack[1].path: cannot create {tmp}/file/sub"),
    "two disk tiers on one path": (CPU + "  - backend: disk\n    path: {tmp}/d\n"
                                   "  - backend: disk\n    name: disk2\n    path: {tmp}/d/\n",
                                   "stack[2]: stack[1] already uses directory {tmp}/d"),
    "redis inline password": (CPU + "  - backend: redis\n    url: redis://:hunter2@127.0.0.1:6379/0\n",
                              "stack[1].url: must not contain a password"),
    "redis ttl 0": (CPU + "  - backend: redis\n    url: redis://127.0.0.1:6379/0\n    ttl: 0\n",
                    "stack[1].ttl: must be a positive number of seconds"),
    "redis http scheme": (CPU + "  - backend: redis\n    url: http://127.0.0.1:6379/0\n",
                          "stack[1].url: 'http' is not a supported scheme"),
    "redis password env unset": (CPU + "  - backend: redis\n    url: redis://127.0.0.1:6379/0\n"
                                 "    password_env: KVSTACKS_TEST_UNSET_VARIABLE\n",
                                 "stack[1].password_env: environment variable 'KVSTACKS_TEST_UNSET_VARIABLE' is not set"),
    "pin_memory without CUDA": ("  - backend: cpu\n    pin_memory: true\n", "stack[0].pin_memory: pinned host memory needs CUDA"),
    "controller url": (CPU + "controller:\n  url: nope\n  instance_id: a\n", "controller.url: expected http://host:port"),
    "controller interval": (CPU + "controller:\n  url: http://127.0.0.1:9\n  instance_id: a\n  heartbeat_interval: 0\n",
                            "controller.heartbeat_interval: must be a positive number of seconds"),
    "controller instance_id": (CPU + "controller:\n  url: http://127.0.0.1:9\n", "controller.instance_id: is required"),
    "capacity 0": ("  - backend: cpu\n    capacity: 0\n", "stack[0].capacity: must be a positive size"),
    "chunk_size huge": (CPU + "chunk_size: 100000000000\n", "chunk_size: must be a number of tokens from 1 to 1048576"),
    "empty tier name": ("  - backend: cpu\n    name: ''\n", "stack[0].name: must be a non-empty string"),
    "duplicate key": ("  - backend: cpu\n    capacity: 1MiB\n    capacity: 2MiB\n", "key 'capacity' appears twice"),
    "offload workers": (CPU + "offload:\n  workers: -3\n", "offload.workers: must be between 1"),
    "offload retries": (CPU + "offload:\n  retries: -1\n", "offload.retries: must be between 0"),
    "offload backoff": (CPU + "offload:\n  backoff_s: -1\n", "offload.backoff_s: must be seconds between 0"),
    "rank beyond world_size": (CPU + "world_size: 2\nrank: 5\n", "rank: must be from 0 to world_size - 1 = 1, got 5"),
    "world_size 0": (CPU + "world_size: 0\n", "world_size: must be at least 1"),
    "rank negative": (CPU + "rank: -1\n", "rank: must be from 0 to world_size - 1 = 0, got -1"),
    "s3fifo small_ratio": ("  - backend: cpu\n    eviction: s3fifo\n    eviction_options:\n      small_ratio: 2.0\n",
                           "stack[0].eviction_options.small_ratio: must be between 0 and 1"),
    "s3fifo ghost_ratio": ("  - backend: cpu\n    eviction: s3fifo\n    eviction_options:\n      ghost_ratio: -1\n",
                           "stack[0].eviction_options.ghost_ratio: must be 0 or more"),
    "lz4 acceleration": ("  - backend: cpu\n    compressor: lz4\n    compressor_options:\n      acceleration: 0\n",
                         "stack[0].compressor_options.acceleration: lz4 acceleration must be between"),
}


@pytest.fixture(scope="module")
def plugins_present():
    require("kvstacks_disk", "pip install -e plugins/disk")
    require("kvstacks_redis", "pip install -e plugins/redis")


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_refuses_by_path(case, tmp_path, plugins_present):
    yaml_text, expected = CASES[case]
    (tmp_path / "file").write_text("")
    stack = tmp_path / "stack.yaml"
    stack.write_text("stack:\n" + yaml_text.replace("{tmp}", str(tmp_path)))
    result = CliRunner().invoke(cli, ["check", str(stack)])
    assert result.exit_code == 1, result.output
    assert expected.replace("{tmp}", str(tmp_path)) in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "stack.yaml"]  # check created nothing


def test_check_and_engine_start_agree(tmp_path, plugins_present):
    """Whatever check accepts here, the engine starts with; what it refuses, the engine refuses alike."""
    from kvstacks import CacheEngine
    from kvstacks.config import load_yaml
    from kvstacks.errors import ConfigError

    stack = tmp_path / "stack.yaml"
    stack.write_text(f"stack:\n{CPU}  - backend: disk\n    path: {tmp_path}/d\n")
    load_yaml(stack)
    CacheEngine.from_yaml(stack).close()
    (tmp_path / "f").write_text("")
    stack.write_text(f"stack:\n{CPU}  - backend: disk\n    path: {tmp_path}/f\n")
    with pytest.raises(ConfigError) as refused:
        load_yaml(stack)
    with pytest.raises(ConfigError) as failed:
        CacheEngine.from_yaml(stack)
    assert str(refused.value) == str(failed.value)
