"""The connector's stack: read from ``kv_connector_extra_config``, one engine per worker."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvstacks import CacheEngine
from kvstacks.config import StackConfig, load_yaml, parse_stack
from kvstacks.errors import ConfigError


def stack_config(extra: Mapping[str, Any] | None, model: str) -> StackConfig:
    """``{"config": "stack.yaml"}`` or ``{"stack": {...}}`` (the YAML as a mapping).

    A stack that names no model is keyed by vLLM's model name, so two models never share chunks.
    """
    extra = extra or {}
    if ("config" in extra) == ("stack" in extra):
        raise ConfigError(
            "kv_connector_extra_config",
            'give exactly one of "config" (a stack YAML file) or "stack" (the same as a mapping), '
            'e.g. {"config": "stack.yaml"}',
        )
    if "config" in extra:
        config = load_yaml(extra["config"])
    else:
        config = parse_stack(extra["stack"], source="kv_connector_extra_config.stack")
    if config.model == "default":
        config = dataclasses.replace(config, model=model)
    return config


def engine_for(config: StackConfig, rank: int, world_size: int) -> CacheEngine:
    """This worker's engine: its rank's shard of the KV, keyed apart from the other ranks'."""
    return CacheEngine(dataclasses.replace(config, rank=rank, world_size=world_size))
