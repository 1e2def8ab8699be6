"""The builtin p2p tier inside one engine: read-only, a miss without peers, needs a controller."""

from __future__ import annotations

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.errors import ConfigError, InvalidInput
from kvstacks.testing import free_port


def kv(n: int) -> torch.Tensor:
    return torch.randn(2, 2, n, 8).to(torch.float16)


def test_p2p_needs_the_controller_section():
    with pytest.raises(ConfigError, match=r"stack\[1\].*add a controller: section"):
        CacheEngine.from_config({"chunk_size": 4, "stack": [{"backend": "test-dict"}, {"backend": "p2p"}]})


def test_p2p_tier_is_never_written_and_misses_without_peers():
    # The controller is down: the agent keeps trying to register, the peer tier finds no one.
    config = {
        "chunk_size": 4,
        "write_mode": "through",
        "stack": [{"backend": "test-dict", "capacity": "1KiB"}, {"backend": "p2p"}],
        "controller": {"url": f"http://127.0.0.1:{free_port()}", "instance_id": "solo",
                       "transfer_channels": ["tcp"]},
    }
    with CacheEngine.from_config(config) as e:
        tokens = list(range(64))  # more than the top tier holds: victims would be demoted
        e.store(tokens, kv(64))
        assert e.flush(5)
        assert e.stats()["p2p"]["stores"] == 0 and e.stats()["p2p"]["errors"] == 0
        assert e.lookup_tiers(list(range(100, 108)))["p2p"] == 0
        assert e.retrieve(list(range(100, 108))) == (None, 0)
        e.store([7, 7, 7, 7], kv(4))
        exported = e.export_chunks([7, 7, 7, 7])
        assert len(exported) == 1
        with pytest.raises(InvalidInput, match="read-only"):
            e.import_chunks(exported, "p2p")
