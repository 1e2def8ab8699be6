"""``kvstacks config from-lmcache``: LMCache's worker config in, a stack that passes check out."""

from __future__ import annotations

import pathlib
import re

import yaml
from click.testing import CliRunner
from kvstacks.cli import cli
from kvstacks.config import parse_stack
from kvstacks.lmcache import translate

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"

# The worker config of the seed document (000), with a disk and a remote tier added.
SEED = {
    "chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5,
    "enable_controller": True, "lmcache_instance_id": "lmcache_instance_1",
    "controller_pull_url": "controller.svc.cluster.local:8300",
    "controller_reply_url": "controller.svc.cluster.local:8400",
    "lmcache_worker_ports": [8001],
    "enable_p2p": True, "p2p_host": "localhost", "p2p_init_ports": [8200], "transfer_channel": "nixl",
}


def test_seed_config_translates_to_a_valid_stack(tmp_path):
    config = dict(SEED, local_disk=f"file://{tmp_path}/disk/", max_local_disk_size=20,
                  remote_url="redis://:secret@127.0.0.1:6379/0", remote_serde="cachegen",
                  use_layerwise=True, caching_policy="LFU")
    result = translate(config)
    assert result.stack["chunk_size"] == 256
    assert result.stack["stack"] == [
        {"backend": "cpu", "capacity": "5GiB", "eviction": "lfu"},
        {"backend": "disk", "path": f"{tmp_path}/disk/", "capacity": "20GiB", "eviction": "lfu"},
        {"backend": "redis", "url": "redis://127.0.0.1:6379/0", "compressor": "cachegen"},
        {"backend": "p2p"},
    ]
    assert result.stack["controller"] == {"url": "http://controller.svc.cluster.local:9000",
                                          "instance_id": "lmcache_instance_1", "transfer_channels": ["nixl"]}
    notes = "\n".join(result.notes)
    for key in ("controller_reply_url", "lmcache_worker_ports", "p2p_init_ports", "use_layerwise"):
        assert f"{key}: no equivalent" in notes
    assert "password_env" in notes
    parse_stack(result.stack)  # passes what check checks


def test_mooncake_and_unknown_remotes():
    result = translate({"remote_url": "mooncakestore://10.0.0.2:50051/", "remote_serde": "kivi"})
    assert result.stack["stack"][1] == {"backend": "mooncake", "master": "10.0.0.2:50051"}
    result = translate({"remote_url": "lm://10.0.0.3:65432", "max_local_cpu_size": "lots"})
    assert [t["backend"] for t in result.stack["stack"]] == ["cpu"]
    notes = "\n".join(result.notes)
    assert "'lm://10.0.0.3:65432' (lm) has no kvstacks backend" in notes
    assert "max_local_cpu_size: 'lots' is not a number of GB" in notes


def test_cli_writes_yaml_and_notes(tmp_path):
    source = tmp_path / "lmcache.yaml"
    source.write_text(yaml.safe_dump(SEED))
    out = tmp_path / "stack.yaml"
    result = CliRunner().invoke(cli, ["config", "from-lmcache", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: lmcache_worker_ports: no equivalent" in result.output
    assert "does not pass" not in result.output
    text = out.read_text()
    assert "# NOTE controller_reply_url: no equivalent" in text
    assert CliRunner().invoke(cli, ["check", str(out)]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just a list\n")
    result = CliRunner().invoke(cli, ["config", "from-lmcache", str(bad)])
    assert result.exit_code == 1 and "is not an LMCache config" in result.output


def test_the_migration_guide_shows_what_the_command_writes():
    text = (DOCS / "migrating-from-lmcache.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    source, written = yaml.safe_load(blocks[0]), yaml.safe_load(blocks[1])
    assert translate(source).stack == written
