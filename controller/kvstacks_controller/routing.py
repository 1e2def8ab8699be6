"""KV-aware routing: rank instances by the prefix of a prompt each can serve, and where it sits.

A router (a gateway extension, a proxy) asks ``POST /route`` before sending a
request and picks the first instance of the answer. Each instance is scored by

    score = prefix_score - load_weight * load

``prefix_score`` is the share of the prompt's tokens the instance holds as a
prefix, each chunk weighted by the best tier holding it (``cpu`` 1.0 above
``disk`` 0.8 above any other, shared, tier 0.5 by default), so a prefix in host
memory beats the same prefix on disk, and a longer prefix on disk can still beat a
short one in memory. ``load`` is what the caller says about each candidate (0 idle
.. 1 saturated; the controller does not know queue depths), so the prefix decides
unless an instance is busy.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from kvstacks.keys import chunk_bounds, hash_chain

from kvstacks_controller.cluster import Cluster, _array
from kvstacks_controller.command import Command, CommandError
from kvstacks_controller.registry import Worker
from kvstacks_controller.settings import DEFAULT_TIER_WEIGHTS

#: The weights' key for any tier they do not name.
OTHER = "*"


def tier_weight(weights: Mapping[str, float], tier: str) -> float:
    return float(weights.get(tier, weights.get(OTHER, DEFAULT_TIER_WEIGHTS[OTHER])))


def _group_scores(
    ctx: Cluster, group: list[Worker], tokens: np.ndarray, salt: bytes, weights: Mapping[str, float]
) -> list[tuple[int, float, dict[str, int]]]:
    """(matched tokens, weighted tokens, tokens each tier alone holds) per worker of one chunk size."""
    chunk_size = group[0].chunk_size
    hashes = hash_chain(tokens, chunk_size, salt, partial=True)
    bounds = chunk_bounds(len(tokens), chunk_size, True)
    present = ctx.index.presence(hashes)  # (chunks, holders)
    # Column -1 of the padded matrix is "nobody": workers with fewer tiers point their spare slots there.
    padded = np.zeros((present.shape[0], present.shape[1] + 1), dtype=bool)
    padded[:, : present.shape[1]] = present
    slots = max(len(w.holders) for w in group)
    cols = np.full((len(group), slots), -1, dtype=np.int64)
    tier_w = np.zeros((len(group), slots))
    for i, worker in enumerate(group):
        for j, (tier, hid) in enumerate(worker.holders.items()):
            if hid < present.shape[1]:
                cols[i, j] = hid
            tier_w[i, j] = tier_weight(weights, tier)
    held = padded[:, cols]  # (chunks, workers, tiers)
    lengths = np.array([end - start for start, end in bounds], dtype=np.float64)
    ends = np.array([0] + [end for _, end in bounds])
    matched = np.cumprod(held.any(axis=2), axis=0).sum(axis=0)  # chunks, per worker
    best = (held * tier_w[None]).max(axis=2)  # best tier weight of each chunk
    in_prefix = np.arange(len(bounds))[:, None] < matched[None, :]
    weighted = (best * lengths[:, None] * in_prefix).sum(axis=0)
    alone = np.cumprod(held, axis=0).sum(axis=0)  # (workers, tiers)
    out = []
    for i, worker in enumerate(group):
        tiers = {tier: int(ends[alone[i, j]]) for j, tier in enumerate(worker.holders)}
        out.append((int(ends[matched[i]]), float(weighted[i]), tiers))
    return out


def rank(
    ctx: Cluster,
    tokens: Any,
    salt: str = "",
    candidates: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
    load_weight: float | None = None,
) -> list[dict[str, Any]]:
    """Instances best first, each with its score, matched tokens and tokens per tier.

    ``candidates`` (instance id -> load) limits the answer to those instances, in any
    state: an unknown or unhealthy one is ranked with no prefix. Without it, every
    registered instance is ranked (load 0).
    """
    weights = {**ctx.settings.tier_weights, **(weights or {})}
    load_weight = ctx.settings.load_weight if load_weight is None else load_weight
    array = _array(tokens)
    n = len(array)
    workers = ctx.registry.healthy_workers()
    if candidates is not None:
        workers = [w for w in workers if w.instance_id in candidates]
    per_instance: dict[str, list[tuple[int, float, dict[str, int]]]] = {}
    if n and workers:
        by_size: dict[int, list[Worker]] = {}
        for worker in workers:
            by_size.setdefault(worker.chunk_size, []).append(worker)
        salt_bytes = salt.encode()
        for group in by_size.values():
            for worker, scores in zip(group, _group_scores(ctx, group, array, salt_bytes, weights)):
                per_instance.setdefault(worker.instance_id, []).append(scores)
    registered = ctx.registry.instances()
    names = candidates.keys() if candidates is not None else registered.keys()
    ranks_of = Counter(w.instance_id for w in ctx.registry.workers.values())
    out = []
    for instance_id in names:
        ranks = per_instance.get(instance_id, [])
        healthy = bool(ranks) and len(ranks) == ranks_of[instance_id]
        if healthy:
            # Every rank must hold a chunk for the instance to serve it: the shortest rank decides.
            matched = min(r[0] for r in ranks)
            weighted = min(r[1] for r in ranks)
            tiers = {t: min(r[2].get(t, 0) for r in ranks) for t in ranks[0][2]}
        else:
            matched, weighted, tiers = 0, 0.0, {}
        load = float(candidates[instance_id]) if candidates is not None else 0.0
        prefix_score = weighted / n if n else 0.0
        entry: dict[str, Any] = {
            "instance_id": instance_id,
            "score": round(prefix_score - load_weight * load, 6),
            "matched_tokens": matched,
            "prefix_score": round(prefix_score, 6),
            "load": load,
            "tiers": tiers,
        }
        if instance_id not in registered:
            entry["registered"] = False
        elif not healthy:
            entry["healthy"] = False
        out.append(entry)
    out.sort(key=lambda e: (-e["score"], -e["matched_tokens"], e["load"], e["instance_id"]))
    return out


_WEIGHTS = {
    "type": "object",
    "description": "tier name -> weight of a chunk held there ('*': any other tier)",
    "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1000},
}


class Route(Command):
    """Which instance should serve a prompt: instances ranked by the cached prefix each holds."""

    name = "route"
    mutating = False
    summary = (
        "Rank instances for a prompt: score = prefix share weighted by tier - load_weight * load; "
        "best first, with matched tokens per instance and per tier"
    )
    request_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tokens": {"$ref": "#/components/schemas/Tokens"},
            "tokens_b64": {
                "type": "string",
                "description": "instead of tokens: the token ids as little-endian int32, base64 "
                "(a 32K-token prompt parses ~5x faster than a JSON list)",
            },
            "salt": {"type": "string", "maxLength": 1024},
            "candidates": {
                "type": "array",
                "maxItems": 4096,
                "description": "instances the router may send to, each an instance_id or "
                "{instance_id, load}; load 0 (idle) .. 1 (saturated)",
                "items": {},
            },
            "tier_weights": _WEIGHTS,
            "load_weight": {"type": "number", "minimum": 0, "maximum": 1000},
        },
    }
    response_schema = {
        "type": "object",
        "required": ["instances", "num_tokens"],
        "properties": {
            "num_tokens": {"type": "integer"},
            "instances": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "instance_id": {"type": "string"},
                        "score": {"type": "number"},
                        "matched_tokens": {"type": "integer"},
                        "prefix_score": {"type": "number"},
                        "load": {"type": "number"},
                        "tiers": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "registered": {"type": "boolean"},
                        "healthy": {"type": "boolean"},
                    },
                },
            },
        },
    }

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        tokens = _tokens(body, ctx.settings.max_tokens)
        candidates = _candidates(body.get("candidates"))
        instances = rank(
            ctx,
            tokens,
            body.get("salt", ""),
            candidates,
            _weights(body.get("tier_weights")),
            body.get("load_weight"),
        )
        return {"num_tokens": len(tokens), "instances": instances}


def _tokens(body: dict[str, Any], max_tokens: int) -> Any:
    if ("tokens" in body) == ("tokens_b64" in body):
        raise CommandError(400, "tokens: send either tokens (a list of ids) or tokens_b64, not both or neither")
    if "tokens" in body:
        return body["tokens"]
    try:
        raw = base64.b64decode(body["tokens_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(400, "tokens_b64: not base64 (standard alphabet, with padding)") from None
    if len(raw) % 4:
        raise CommandError(400, f"tokens_b64: {len(raw)} bytes is not a whole number of int32 token ids")
    tokens = np.frombuffer(raw, dtype="<i4")
    if tokens.size > max_tokens:
        raise CommandError(413, f"tokens_b64: {tokens.size} tokens, more than the limit of {max_tokens}")
    if tokens.size and int(tokens.min()) < 0:
        i = int(tokens.argmin())
        raise CommandError(400, f"tokens_b64: token {i} is negative ({int(tokens[i])}); ids are int32 >= 0")
    return tokens


def _weights(weights: dict[str, Any] | None) -> dict[str, float] | None:
    if weights is None:
        return None
    if len(weights) > 64:
        raise CommandError(400, "tier_weights: at most 64 tiers")
    for tier, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1000:
            raise CommandError(400, f"tier_weights.{tier}: expected a number from 0 to 1000, got {weight!r}")
    return weights


def _candidates(items: list[Any] | None) -> dict[str, float] | None:
    if items is None:
        return None
    out: dict[str, float] = {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            instance_id, load = item, 0.0
        elif isinstance(item, dict) and isinstance(item.get("instance_id"), str):
            extra = sorted(set(item) - {"instance_id", "load"})
            if extra:
                raise CommandError(400, f"candidates[{i}].{extra[0]}: unknown field; allowed: instance_id, load")
            instance_id, load = item["instance_id"], item.get("load", 0.0)
            if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 <= load <= 1e6:
                raise CommandError(400, f"candidates[{i}].load: expected a number >= 0, got {load!r}")
        else:
            raise CommandError(
                400,
                f"candidates[{i}]: expected an instance_id string or "
                f'{{"instance_id": ..., "load": ...}}, got {str(item)[:60]!r}',
            )
        if not instance_id or len(instance_id) > 256:
            raise CommandError(400, f"candidates[{i}].instance_id: expected 1 to 256 characters")
        out[instance_id] = float(load)
    return out
COMMANDS = (Route,)
