"""Offload settings and what happens to writes that do not make it to a lower tier."""

from __future__ import annotations

import errno
import logging

import pytest
import torch
from kvstacks import CacheEngine, faults
from kvstacks.errors import ConfigError, PermanentError
from kvstacks.metrics import REGISTRY
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

LAYERS, HIDDEN = 2, 8


def kv_for(n, seed=0):
    return torch.randn(2, LAYERS, n, HIDDEN, generator=torch.Generator().manual_seed(seed)).half()


def stack(offload=None, **remote):
    cfg = {"model": "offload-test", "chunk_size": 16,
           "stack": [{"backend": "test-dict"}, {"backend": "test-remote", "store": "offload", **remote}]}
    if offload is not None:
        cfg["offload"] = offload
    return cfg


@pytest.mark.parametrize("setting, value", [
    ("retries", -1), ("retries", 10**6), ("workers", 0), ("workers", -3), ("backoff_s", -0.5),
    ("backoff_s", float("nan")), ("queue_bytes", 0), ("queue_bytes", "-1"),
])
def test_nonsensical_offload_settings_are_config_errors_with_the_yaml_path(setting, value):
    # On main, retries: -1 was accepted and silently disabled every lower-tier write.
    with pytest.raises(ConfigError, match=rf"^offload\.{setting}: ") as err:
        CacheEngine.from_config(stack({setting: value}))
    assert "got" in str(err.value) or "size" in str(err.value)


def test_zero_retries_is_one_try_and_the_queue_is_sized_from_the_top_tier():
    cfg = stack({"retries": 0})
    cfg["stack"][0]["capacity"] = "4MiB"
    with CacheEngine.from_config(cfg) as e:
        assert e.offloader.queue_bytes == 4 << 20  # the top tier's capacity
        e.store(list(range(32)), kv_for(32))
        assert e.flush(10)
        assert e.lookup_tiers(list(range(32)))["test-remote"] == 32
    with CacheEngine.from_config(stack({"queue_bytes": "3MiB"})) as e:
        assert e.offloader.queue_bytes == 3 << 20
    with CacheEngine.from_config(stack()) as e:
        assert e.offloader.queue_bytes == 1 << 30  # an unbounded top tier: the 1 GiB default


def test_writes_still_queued_at_close_are_counted_as_dropped():
    e = CacheEngine.from_config(stack({"workers": 1}, delay=0.3))
    e.store(list(range(16 * 6)), kv_for(16 * 6))
    remote = e.tier("test-remote")
    e.close(timeout=0.05)
    stats = remote.stats
    assert stats.dropped >= 5, f"6 writes queued, at most one done at close; dropped counted: {stats.dropped}"
    assert e.offloader.depth["test-remote"] == 0 and e.offloader._queued_bytes == 0


def test_a_full_disk_is_not_retried_is_counted_by_kind_and_logged_once_per_burst(caplog):
    # On main ENOSPC was retried 3 times per chunk with backoff and every chunk logged its own warning.
    cfg = stack({"retries": 3, "backoff_s": 0.2})
    with CacheEngine.from_config(cfg) as e:
        e.tier("test-remote").backend.put_error = OSError(errno.ENOSPC, "No space left on device")
        with caplog.at_level(logging.WARNING, logger="kvstacks"):
            e.store(list(range(16 * 10)), kv_for(16 * 10))
            assert e.flush(10)
        s = e.stats()["test-remote"]
        assert s["retries"] == 0, "a permanent failure was retried"
        assert s["dropped"] == 10 and s["errors"] == 10 and s["error_kinds"] == {"ENOSPC": 10}
        lines = [r.getMessage() for r in caplog.records if "ENOSPC" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "permanent" in lines[0]
        values = {(s.labels["kind"]): s.value for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
                  for s in family.samples if s.name == "kvstacks_tier_errors_by_kind_total"
                  and s.labels.get("model") == "offload-test"}
        assert values == {"ENOSPC": 10}
        caplog.clear()
    # closing reports how many more the burst held back
    assert any("9 more like it" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("exc, permanent", [
    (OSError(errno.ENOSPC, "full"), True), (OSError(errno.EROFS, "read-only"), True),
    (PermissionError(errno.EACCES, "denied"), True), (OSError(errno.EDQUOT, "quota"), True),
    (PermanentError("broken for good"), True), (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False),
    (TimeoutError(), False), (OSError(errno.EIO, "i/o"), False), (RuntimeError("?"), False),
])
def test_error_classes(exc, permanent):
    assert faults.is_permanent(exc) is permanent


def test_transient_failures_are_still_retried():
    with CacheEngine.from_config(stack({"retries": 2, "backoff_s": 0.01})) as e:
        e.tier("test-remote").backend.put_error = ConnectionResetError(errno.ECONNRESET, "reset")
        e.store(list(range(16)), kv_for(16))
        assert e.flush(10)
        s = e.stats()["test-remote"]
        assert s["retries"] == 2 and s["dropped"] == 1 and s["error_kinds"] == {"ECONNRESET": 3}
