import torch
from kvstacks import CacheEngine
from kvstacks.metrics import REGISTRY
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def test_tier_metrics_follow_engine_stats():
    with CacheEngine.from_config({"model": "metrics-test", "chunk_size": 16,
                                  "stack": [{"backend": "test-dict", "capacity": "1MiB"}]}) as engine:
        tokens = list(range(32))
        engine.store(tokens, torch.zeros(2, 1, 32, 4, dtype=torch.float16))
        engine.retrieve(tokens)
        engine.retrieve([7] * 16)
        engine.pin(tokens)
        text = generate_latest(REGISTRY).decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.labels.get("model") == "metrics-test"}
    assert values["kvstacks_tier_hits_total"] == 2
    assert values["kvstacks_tier_misses_total"] == 1
    assert values["kvstacks_tier_objects"] == 2
    assert values["kvstacks_tier_bytes"] == 512
    assert values["kvstacks_tier_capacity"] == 1 << 20
    assert values["kvstacks_tier_pins"] == 2
    assert "kvstacks_tier_write_seconds_bucket" in text and "kvstacks_tier_read_seconds_bucket" in text
    assert "kvstacks_store_seconds_count" in text and "kvstacks_retrieve_seconds_bucket" in text
    # a closed engine's tiers are no longer reported
    assert 'kvstacks_tier_objects{model="metrics-test"' not in generate_latest(REGISTRY).decode()
