"""A real cluster on loopback: one controller process, two worker processes with real engines.

Every endpoint is driven end to end with the seed's curl bodies (instance ids
``lmcache_instance_1``/``lmcache_instance_2``, location ``LocalCPUBackend``),
then the controller is restarted and a worker is killed with SIGKILL.
Workers run a CPU tier over a disk tier (``kvstacks-cpu``, ``kvstacks-disk``).
The tests in this module run in order and share the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from kvstacks.testing import free_port, require, wait_for

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
LONG_PROMPT = list(range(1000, 1040))  # 10 chunks of 4
CHUNK = 4
HEARTBEAT = 0.3
TIMEOUT = 2.0
ADMIN = "admin-secret"
WORKER = "worker-secret"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKER_SCRIPT = textwrap.dedent("""
    import json, signal, sys, threading
    import torch
    from kvstacks import CacheEngine

    spec = json.loads(sys.argv[1])
    engine = CacheEngine.from_config(spec["stack"])
    gen = torch.Generator().manual_seed(spec["seed"])
    for tokens in spec["prompts"]:
        engine.store(tokens, torch.randn(2, 2, len(tokens), 8, generator=gen).to(torch.float16))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent = engine.agent
    print(json.dumps({"address": agent.address, "transfer": agent.channel_addresses}), flush=True)
    while not stop.wait(0.1):
        pass
    engine.close()
    print("closed", flush=True)
""")


def _env() -> dict[str, str]:
    env = dict(os.environ, KVSTACKS_ADMIN_TOKEN=ADMIN, KVSTACKS_WORKER_TOKEN=WORKER, PYTHONUNBUFFERED="1")
    env.pop("KVSTACKS_LOAD_PLUGINS", None)
    return env


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10, trust_env=False
        )
        self.controller: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}

    def start_controller(self, wait: bool = True) -> None:
        cmd = [
            sys.executable,
            "-c",
            "from kvstacks.cli import main; main()",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--heartbeat-timeout",
            str(TIMEOUT),
            "--worker-timeout",
            "5",
            "--log-level",
            "warning",
        ]
        self.controller = subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=open(self.tmp / "controller.log", "ab")
        )
        if wait:
            self.wait(lambda: self.http.get("/health").status_code == 200, "controller start", timeout=60)

    def stop_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGTERM)
        self.controller.wait(10)

    def start_worker(self, instance: str, prompts: list[list[int]], seed: int) -> subprocess.Popen:
        stack = {
            "model": "test-model",
            "chunk_size": CHUNK,
            "stack": [
                {"backend": "cpu", "capacity": "4MiB"},
                {"backend": "disk", "path": str(self.tmp / instance), "capacity": "16MiB"},
            ],
            "controller": {
                "url": self.url,
                "instance_id": instance,
                "heartbeat_interval": HEARTBEAT,
                "flush_interval": 0.01,
            },
        }
        spec = json.dumps({"stack": stack, "prompts": prompts, "seed": seed})
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, spec],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / f"{instance}.log", "ab"),
            text=True,
        )
        self.workers[instance] = proc
        return proc

    def worker_ready(self, instance: str) -> None:
        """Wait for a started worker to print its address (its engine is built and stored its prompts)."""
        proc = self.workers[instance]
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"worker {instance} died: {(self.tmp / f'{instance}.log').read_text()[-3000:]}"
            )
        self.addresses[instance] = json.loads(line)["address"]

    def worker_command(self, instance: str, op: str, **args) -> dict:
        r = httpx.post(
            f"http://{self.addresses[instance]}/command",
            json={"op": op, "args": args},
            headers={"Authorization": f"Bearer {WORKER}"},
            timeout=10,
            trust_env=False,
        )
        assert r.status_code == 200, r.text
        return r.json()

    def tiers(self, instance: str, tokens: list[int]) -> dict[str, int]:
        return self.worker_command(instance, "lookup_tiers", tokens=tokens)["tiers"]

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def lookup(self, tokens: list[int]) -> dict:
        r = self.post("/lookup", {"tokens": tokens})
        assert r.status_code == 200, r.text
        return r.json()["layout_info"]

    def wait(self, predicate, what: str, timeout: float = 15.0):
        return wait_for(predicate, what, timeout, retry_on=(httpx.HTTPError, AssertionError))

    def finish(self, event_id: str) -> dict:
        def done():
            status = self.post("/check_finish", {"event_id": event_id}).json()
            return status if status["status"] != "pending" else None

        return self.wait(done, f"event {event_id}")

    def close(self) -> None:
        for proc in [*self.workers.values(), self.controller]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.http.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require("kvstacks_cpu", "pip install -e plugins/cpu")
    require("kvstacks_disk", "pip install -e plugins/disk")
    require("kvstacks_controller", "pip install -e controller")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        # All three start at once: workers keep trying to register until the controller is up.
        c.start_controller(wait=False)
        c.start_worker("lmcache_instance_1", [SEED_TOKENS, LONG_PROMPT], seed=1)
        c.start_worker("lmcache_instance_2", [LONG_PROMPT[:20]], seed=2)
        c.wait(lambda: c.http.get("/health").status_code == 200, "controller start", timeout=60)
        c.worker_ready("lmcache_instance_1")
        c.worker_ready("lmcache_instance_2")
        yield c
    finally:
        c.close()


def test_health_lists_both_workers(cluster):
    health = cluster.wait(
        lambda: (
            (h := httpx.get(f"{cluster.url}/health", trust_env=False).json())
            and h["healthy_workers"] == 2
            and h
        ),
        "two healthy workers",
    )
    assert health["controller_status"] == "healthy"
    assert {w["instance_id"] for w in health["workers"]} == {"lmcache_instance_1", "lmcache_instance_2"}
    assert all(w["locations"] == ["cpu", "disk"] for w in health["workers"])
    assert all("address" not in w for w in health["workers"])  # no token, no addresses
    r = cluster.post("/health", {"instance_id": "lmcache_instance_1"})
    assert r.status_code == 200 and r.json()["error_codes"] == {"0": 0}


def test_admin_token_is_required(cluster):
    r = httpx.post(f"{cluster.url}/lookup", json={"tokens": SEED_TOKENS}, trust_env=False)
    assert r.status_code == 401
    assert httpx.get(f"{cluster.url}/metrics", trust_env=False).status_code == 200


def test_plugins_and_openapi(cluster):
    plugins = cluster.http.get("/plugins").json()["plugins"]
    registers = {p["name"]: p["registers"] for p in plugins}
    assert "lookup" in registers["controller"]["commands"]
    assert "tcp" in registers["kvstacks.builtin.transfer"]["transfer_channels"]
    spec = cluster.http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/move" in spec["paths"]


def test_lookup_with_the_seed_body(cluster):
    layout = cluster.wait(lambda: (lay := cluster.lookup(SEED_TOKENS)) and lay, "seed tokens indexed")
    assert layout == {"lmcache_instance_1": ["cpu", 12]}
    layout = cluster.wait(
        lambda: (lay := cluster.lookup(LONG_PROMPT)) and len(lay) == 2 and lay, "both indexed"
    )
    assert layout == {"lmcache_instance_1": ["cpu", 40], "lmcache_instance_2": ["cpu", 20]}
    r = cluster.post("/batch_lookup", {"tokens_list": [SEED_TOKENS, LONG_PROMPT[:8], [5, 6]]})
    assert r.json()["results"] == [
        {"lmcache_instance_1": ["cpu", 12]},
        {"lmcache_instance_1": ["cpu", 8], "lmcache_instance_2": ["cpu", 8]},
        {},
    ]


def test_query_worker_info(cluster):
    r = cluster.post("/query_worker_info", {"instance_id": "lmcache_instance_1", "worker_ids": [0]})
    assert r.status_code == 200
    (info,) = r.json()["worker_infos"]
    assert info["address"] == cluster.addresses["lmcache_instance_1"]
    assert info["chunk_size"] == CHUNK and "tcp" in info["transfer"]
    assert cluster.wait(
        lambda: (
            info["stats"]
            or cluster.post("/query_worker_info", {"instance_id": "lmcache_instance_1"}).json()[
                "worker_infos"
            ][0]["stats"]
        ),
        "stats from heartbeats",
    )


def test_pin_and_unpin_with_the_seed_body(cluster):
    body = {"instance_id": "lmcache_instance_1", "location": "LocalCPUBackend", "tokens": SEED_TOKENS}
    r = cluster.post("/pin", body)
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == 12
    stats = cluster.worker_command("lmcache_instance_1", "stats")["stats"]
    assert stats["cpu"]["pins"] == 3
    metrics = cluster.wait(
        lambda: (
            "kvstacks_controller_pinned_chunks 3.0"
            in (m := httpx.get(f"{cluster.url}/metrics", trust_env=False).text)
            and m
        ),
        "pins in metrics",
    )
    assert 'kvstacks_controller_request_duration_seconds_count{endpoint="pin"} 1.0' in metrics
    r = cluster.post("/unpin", body)
    assert r.status_code == 200 and r.json()["num_tokens"] == 12
    assert cluster.worker_command("lmcache_instance_1", "stats")["stats"]["cpu"]["pins"] == 0


def test_compress_and_decompress(cluster):
    body = {
        "instance_id": "lmcache_instance_1",
        "method": "lz4",
        "location": "LocalCPUBackend",
        "tokens": LONG_PROMPT,
    }
    r = cluster.post("/compress", body)
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == 40
    assert cluster.tiers("lmcache_instance_1", LONG_PROMPT)["cpu"] == 40
    r = cluster.post("/decompress", {k: v for k, v in body.items() if k != "method"})
    assert r.status_code == 200 and r.json()["num_tokens"] == 40
    r = cluster.post("/compress", dict(body, method="no-such-codec"))
    assert r.status_code == 400 and "no-such-codec" in r.json()["error"]


def test_move_with_the_seed_body(cluster):
    body = {
        "old_position": ["lmcache_instance_1", "LocalCPUBackend"],
        "new_position": ["lmcache_instance_2", "LocalCPUBackend"],
        "tokens": SEED_TOKENS,
        "copy": False,
    }
    r = cluster.post("/move", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["num_tokens"] == 12 and answer["event_id"]
    status = cluster.finish(answer["event_id"])
    assert status["status"] == "finished", status
    assert status["result"]["num_tokens"] == 12
    assert cluster.tiers("lmcache_instance_2", SEED_TOKENS)["cpu"] == 12
    assert cluster.tiers("lmcache_instance_1", SEED_TOKENS)["cpu"] == 0  # removed after the confirmation
    layout = cluster.wait(
        lambda: (lay := cluster.lookup(SEED_TOKENS)).get("lmcache_instance_2") and lay,
        "the moved chunks indexed",
    )
    assert layout["lmcache_instance_2"] == ["cpu", 12]


def test_move_copy_inside_one_instance(cluster):
    body = {
        "old_position": ["lmcache_instance_2", "cpu"],
        "new_position": ["lmcache_instance_2", "disk"],
        "tokens": SEED_TOKENS,
        "copy": True,
    }
    r = cluster.post("/move", body)
    assert r.status_code == 200, r.text
    assert cluster.finish(r.json()["event_id"])["status"] == "finished"
    tiers = cluster.tiers("lmcache_instance_2", SEED_TOKENS)
    assert tiers["cpu"] == 12 and tiers["disk"] == 12


def test_clear_with_the_seed_body(cluster):
    r = cluster.post("/clear", {"instance_id": "lmcache_instance_2", "location": "LocalCPUBackend"})
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] > 0
    assert cluster.tiers("lmcache_instance_2", LONG_PROMPT)["cpu"] == 0
    layout = cluster.lookup(LONG_PROMPT)
    assert layout.get("lmcache_instance_2", ["disk"])[0] == "disk"  # the disk copies are still there


def test_errors_name_the_problem(cluster):
    r = cluster.post("/clear", {"instance_id": "nobody", "location": "LocalCPUBackend"})
    assert r.status_code == 404 and "lmcache_instance_1" in r.json()["error"]
    r = cluster.post("/pin", {"instance_id": "lmcache_instance_1", "location": "gpu", "tokens": [1]})
    assert r.status_code == 404 and "its locations: cpu, disk" in r.json()["error"]
    r = cluster.post("/check_finish", {"event_id": "evt_unknown"})
    assert r.status_code == 404


def test_controller_restart_rebuilds_the_view(cluster):
    before = {tuple(p): cluster.lookup(p) for p in (SEED_TOKENS, LONG_PROMPT)}
    cluster.stop_controller()
    cluster.start_controller()
    for prompt, layout in before.items():
        cluster.wait(
            lambda prompt=prompt, layout=layout: cluster.lookup(list(prompt)) == layout,
            f"layout of {prompt[:3]} after restart",
            timeout=HEARTBEAT * 4 + 10,
        )
    assert cluster.http.get("/health").json()["healthy_workers"] == 2


def test_sigkilled_worker_goes_unhealthy_and_a_failed_move_keeps_the_source(cluster):
    victim = cluster.workers["lmcache_instance_2"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    # Still "healthy" for up to the heartbeat timeout: a move to it fails, the source keeps its chunks.
    held = cluster.tiers("lmcache_instance_1", LONG_PROMPT)["cpu"]
    r = cluster.post(
        "/move",
        {
            "old_position": ["lmcache_instance_1", "cpu"],
            "new_position": ["lmcache_instance_2", "cpu"],
            "tokens": LONG_PROMPT,
            "copy": False,
        },
    )
    if r.status_code == 200:
        status = cluster.finish(r.json()["event_id"])
        assert status["status"] == "failed" and status["reason"], status
    else:
        assert r.status_code == 409  # the timeout already passed
    assert cluster.tiers("lmcache_instance_1", LONG_PROMPT)["cpu"] == held == 40
    cluster.wait(
        lambda: "lmcache_instance_2" not in cluster.lookup(LONG_PROMPT),
        "dead worker out of lookups",
        timeout=TIMEOUT + 5,
    )
    health = httpx.get(f"{cluster.url}/health", trust_env=False).json()
    status = {w["instance_id"]: w["status"] for w in health["workers"]}
    assert status == {"lmcache_instance_1": "healthy", "lmcache_instance_2": "unhealthy"}
    r = cluster.post("/pin", {"instance_id": "lmcache_instance_2", "location": "cpu", "tokens": LONG_PROMPT})
    assert r.status_code == 409 and "no healthy worker" in r.json()["error"]
    metrics = httpx.get(f"{cluster.url}/metrics", trust_env=False).text
    assert 'kvstacks_worker_healthy{instance_id="lmcache_instance_2",worker_id="0"} 0.0' in metrics


def test_worker_coming_back_rejoins(cluster):
    cluster.start_worker("lmcache_instance_2", [LONG_PROMPT[:20]], seed=2)
    cluster.worker_ready("lmcache_instance_2")
    # Reports arrive in batches (a resync of what the worker found on disk, then its new store):
    # wait for the whole prompt rather than for the first report.
    layout = cluster.wait(
        lambda: (lay := cluster.lookup(LONG_PROMPT)).get("lmcache_instance_2", [None, 0])[1] == 20 and lay,
        "restarted worker indexed with its whole prompt",
    )
    assert layout["lmcache_instance_2"][1] == 20


def test_closing_a_worker_deregisters_it(cluster):
    proc = cluster.workers["lmcache_instance_1"]
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "closed"
    proc.wait(10)
    cluster.wait(
        lambda: all(
            w["instance_id"] != "lmcache_instance_1" for w in cluster.http.get("/health").json()["workers"]
        ),
        "deregistration",
    )
    assert "lmcache_instance_1" not in cluster.lookup(SEED_TOKENS)
