"""Translate an LMCache worker configuration into a kvstacks stack.

``kvstacks config from-lmcache lmcache.yaml`` uses it. LMCache names its tiers by
option (``local_cpu``, ``local_disk``, ``remote_url``) and sizes them in GB; a
kvstacks stack lists the tiers top first, each with a backend, a capacity and its
options. Whatever has no equivalent is reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: LMCache options that tune its GPU side or features kvstacks does not have.
NO_EQUIVALENT = {
    "use_layerwise": "kvstacks stores whole chunks; there is no layer-wise pipelining",
    "save_decode_cache": "kvstacks stores what the serving engine hands it; the integration decides",
    "enable_blending": "CacheBlend is not implemented",
    "blend_recompute_ratio": "CacheBlend is not implemented",
    "blend_min_tokens": "CacheBlend is not implemented",
    "gpu_memory_utilization": "a vLLM setting, not a cache one: pass it to vLLM",
    "cpu_offloading_threshold": "kvstacks writes every stored chunk to the top tier at once",
    "min_retrieve_tokens": "no minimum: every cached prefix is used",
    "pre_caching_hash_algorithm": "kvstacks always hashes chunks with xxh3-128 (portable across processes)",
    "lmcache_worker_ports": "each worker's agent picks a free port and tells the controller (controller.listen_port fixes one)",
    "controller_reply_url": "workers talk HTTP to the controller's API port; there is no separate reply socket",
    "p2p_init_ports": "each worker's transfer channel picks a free port and registers it with the controller",
    "enable_p2p": "add a tier with backend: p2p (last in the stack) to pull prefixes from peers",
}

EVICTION = {"lru": "lru", "lfu": "lfu", "fifo": "fifo", "s3fifo": "s3fifo", "s3-fifo": "s3fifo"}
SERDE = {"naive": "none", "cachegen": "cachegen", "kivi": None}


@dataclass
class Translation:
    stack: dict[str, Any]
    #: What was carried over approximately or not at all, one line each.
    notes: list[str] = field(default_factory=list)


def _gib(value: Any, option: str, notes: list[str]) -> str | None:
    """LMCache sizes are GB as a number (``5``, ``"200"``, ``2.5``)."""
    try:
        gb = float(value)
    except (TypeError, ValueError):
        notes.append(f"{option}: {value!r} is not a number of GB; set the tier's capacity yourself")
        return None
    if gb <= 0:
        notes.append(f"{option}: {value!r} is not a positive size; the tier is left unbounded")
        return None
    return f"{gb:g}GiB"


def _local_path(value: str) -> str:
    return value[len("file://"):] if value.startswith("file://") else value


def _remote_tier(url: str, notes: list[str]) -> dict[str, Any] | None:
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        if urlsplit(url).password:
            notes.append("remote_url: carries a password; kvstacks reads it from an environment variable: move it "
                         "to one and set password_env on the redis tier")
            parts = urlsplit(url)
            url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return {"backend": "redis", "url": url}
    if scheme in ("mooncakestore", "mooncake"):
        parts = urlsplit(url)
        tier: dict[str, Any] = {"backend": "mooncake"}
        if parts.hostname:
            tier["master"] = f"{parts.hostname}:{parts.port or 50051}"
        notes.append("remote_url: mooncake's metadata server, protocol and segment size are set on the tier "
                     "(metadata_server, protocol, segment_bytes); LMCache read them from its own mooncake config")
        return tier
    notes.append(f"remote_url: {url!r} ({scheme or 'no scheme'}) has no kvstacks backend; the installed ones are "
                 "listed by 'kvstacks plugins' (redis://, mooncakestore:// translate)")
    return None


def translate(config: Any) -> Translation:
    """The kvstacks stack equivalent to an LMCache worker config, and notes on what did not carry over."""
    if not isinstance(config, dict):
        raise ValueError(f"an LMCache config is a mapping of options, got {type(config).__name__}")
    rest = dict(config)
    notes: list[str] = []
    stack: dict[str, Any] = {}
    tiers: list[dict[str, Any]] = []
    if "chunk_size" in rest:
        stack["chunk_size"] = rest.pop("chunk_size")
    eviction_name = rest.pop("caching_policy", None) or rest.pop("eviction_policy", None)
    rest.pop("eviction_policy", None)
    eviction = None
    if eviction_name is not None:
        eviction = EVICTION.get(str(eviction_name).lower())
        if eviction is None:
            notes.append(f"caching_policy: {eviction_name!r} has no builtin equivalent; tiers use lru")

    # The CPU tier: LMCache keeps one unless local_cpu is false; kvstacks needs a top tier anyway.
    local_cpu = rest.pop("local_cpu", True)
    cpu_size = rest.pop("max_local_cpu_size", None)
    if cpu_size is None:
        cpu_size = rest.pop("cpu_offloading_buffer_size", None)
    rest.pop("cpu_offloading_buffer_size", None)
    cpu: dict[str, Any] = {"backend": "cpu"}
    if cpu_size is not None:
        capacity = _gib(cpu_size, "max_local_cpu_size", notes)
        if capacity:
            cpu["capacity"] = capacity
    else:
        cpu["capacity"] = "5GiB"  # LMCache's default max_local_cpu_size
    if local_cpu is False:
        notes.append("local_cpu: false: kvstacks always stores into its top tier first; kept a small cpu tier "
                     "(lower its capacity, or make the disk tier the top one)")
        cpu["capacity"] = "1GiB"
    tiers.append(cpu)

    disk_path = rest.pop("local_disk", None) or rest.pop("local_disk_path", None)
    rest.pop("local_disk_path", None)
    disk_size = rest.pop("max_local_disk_size", None)
    if disk_path:
        disk: dict[str, Any] = {"backend": "disk", "path": _local_path(str(disk_path))}
        if disk_size is not None:
            capacity = _gib(disk_size, "max_local_disk_size", notes)
            if capacity:
                disk["capacity"] = capacity
        tiers.append(disk)
    elif disk_size is not None:
        notes.append("max_local_disk_size: given without local_disk; no disk tier")

    remote_url = rest.pop("remote_url", None)
    remote_backend = rest.pop("remote_backend", None)
    serde = rest.pop("remote_serde", None)
    remote = None
    if remote_url:
        remote = _remote_tier(str(remote_url), notes)
    elif remote_backend:
        remote = _remote_tier(f"{remote_backend}://", notes)
    if remote is not None:
        if serde is not None:
            compressor = SERDE.get(str(serde).lower())
            if compressor is None:
                notes.append(f"remote_serde: {serde!r} has no equivalent; the remote tier stores chunks uncompressed "
                             "(cachegen and lz4 are available)")
            elif compressor != "none":
                remote["compressor"] = compressor
        tiers.append(remote)
    elif serde is not None:
        notes.append("remote_serde: given without a remote tier; ignored")

    if eviction is not None and eviction != "lru":
        for tier in tiers:
            if tier["backend"] in ("cpu", "disk"):
                tier["eviction"] = eviction

    enabled = rest.pop("enable_controller", False)
    instance_id = rest.pop("lmcache_instance_id", None)
    pull_url = rest.pop("controller_pull_url", None)
    if enabled or pull_url:
        host = str(pull_url).rpartition(":")[0] if pull_url else "127.0.0.1"
        host = host.removeprefix("tcp://") or "127.0.0.1"
        stack["controller"] = {"url": f"http://{host}:9000", "instance_id": instance_id or "instance-1"}
        notes.append("controller_pull_url: kvstacks workers speak HTTP to the controller's API port, "
                     "assumed 9000 (kvstacks controller --port); set controller.url if it differs")
        if instance_id is None:
            notes.append("lmcache_instance_id: missing; used instance-1 (each serving instance needs its own)")
        channel = rest.pop("transfer_channel", None)
        if channel:
            stack["controller"]["transfer_channels"] = [str(channel).lower()]
        p2p_host = rest.pop("p2p_host", None)
        if p2p_host and p2p_host not in ("localhost", "127.0.0.1"):
            stack["controller"]["advertise_host"] = p2p_host
    if rest.get("enable_p2p"):
        tiers.append({"backend": "p2p"})
        rest.pop("enable_p2p")
        if "controller" not in stack:
            notes.append("enable_p2p: needs the controller (enable_controller); the p2p tier finds no peers without it")

    for key in sorted(rest):
        reason = NO_EQUIVALENT.get(key, "not an option kvstacks knows")
        notes.append(f"{key}: no equivalent ({reason})")
    ordered = {k: v for k, v in stack.items() if k != "controller"}
    ordered["stack"] = tiers
    if "controller" in stack:
        ordered["controller"] = stack["controller"]
    return Translation(ordered, notes)
