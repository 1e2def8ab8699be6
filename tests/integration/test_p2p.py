"""P2P retrieve and /move over NIXL: a controller and two worker processes with real NIXL agents.

``holder`` stores prompts in a cpu + disk stack; ``puller`` has a cpu tier over a
``p2p`` tier and stores nothing. The test process itself plays two bad peers through
the worker protocol: one that is registered but dead, and one that answers a pull
with chunks of another prompt. The tests run in order and share the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from kvstacks.keys import CacheKey, chunk_hashes
from kvstacks.memory import MemoryObj
from kvstacks.testing import free_port, require, wait_for

CHUNK = 16
PROMPT = list(range(5000, 5160))  # 10 chunks
OTHER = list(range(7000, 7064))  # held only by the lying peer
GHOST = list(range(9000, 9064))  # held only by the dead peer
MODEL = "p2p-model"
HEARTBEAT = 0.3
TIMEOUT = 3.0
ADMIN = "admin-secret"
WORKER = "worker-secret"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# A worker answers one JSON request per stdin line: store, retrieve or lookup_tiers.
WORKER_SCRIPT = textwrap.dedent("""
    import hashlib, json, signal, sys
    import torch
    from kvstacks import CacheEngine

    engine = CacheEngine.from_config(json.loads(sys.argv[1]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def kv_of(tokens):  # each token's KV depends on the token alone, so any prefix's KV is known
        t = torch.tensor(tokens, dtype=torch.float64).view(1, 1, -1, 1)
        k = torch.arange(2 * 4 * 64, dtype=torch.float64).view(2, 4, 1, 64)
        return torch.sin(t * 0.37 + k * 1.3).to(torch.float16)

    agent = engine.agent
    print(json.dumps({"address": agent.address, "transfer": agent.channel_addresses}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "store":
            out = {"stored": engine.store(req["tokens"], kv_of(req["tokens"]))}
            engine.flush()
        elif req["op"] == "retrieve":
            kv, n = engine.retrieve(req["tokens"])
            expected = kv_of(req["tokens"])[:, :, :n]
            out = {"n": n, "exact": bool(n == 0 or torch.equal(kv, expected))}
        else:
            out = {"tiers": engine.lookup_tiers(req["tokens"])}
        print(json.dumps(out), flush=True)
    engine.close()
""")


def _env() -> dict[str, str]:
    env = dict(os.environ, KVSTACKS_ADMIN_TOKEN=ADMIN, KVSTACKS_WORKER_TOKEN=WORKER, PYTHONUNBUFFERED="1")
    env.pop("KVSTACKS_LOAD_PLUGINS", None)
    env.setdefault("UCX_NET_DEVICES", "lo")
    return env


class Worker:
    def __init__(self, tmp: Path, name: str, stack: dict) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, json.dumps(stack)],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"),
            text=True,
        )
        self.info: dict = {}

    def ready(self) -> None:
        line = self.proc.stdout.readline()
        assert line, f"worker {self.name} died: {self.log.read_text()[-3000:]}"
        self.info = json.loads(line)

    def ask(self, op: str, tokens: list[int]) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"worker {self.name} died: {self.log.read_text()[-3000:]}"
        return json.loads(line)


class BadPeer:
    """A worker registered with the controller through the worker protocol, holding chunks it
    does not serve: ``dead`` (nothing listens at its address) or ``liar`` (sends other chunks)."""

    def __init__(self, url: str, instance: str, tokens: list[int], mode: str) -> None:
        self.url, self.instance, self.mode = url, instance, mode
        self.session = uuid.uuid4().hex
        self.calls = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        address = f"127.0.0.1:{free_port() if mode == 'dead' else self.server.server_address[1]}"
        if mode == "liar":
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.ids = {"instance_id": instance, "worker_id": 0, "session": self.session}
        self._post("/worker/register", {
            **self.ids, "address": address, "chunk_size": CHUNK, "tiers": ["cpu"], "model": MODEL,
            "transfer": {"tcp": address},
        })
        hashes = b"".join(chunk_hashes(tokens, CHUNK)).hex()
        self._post("/worker/admit", {**self.ids, "tier": "cpu", "hashes": hashes})
        self.stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _post(self, path: str, body: dict) -> None:
        r = httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {WORKER}"}, trust_env=False)
        assert r.status_code == 200, r.text

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            try:
                self._post("/worker/heartbeat", self.ids)
            except Exception:
                pass

    def _handler(self):
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                from kvstacks.builtin.transfer import TcpChannel

                peer.calls += 1
                args = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["args"]
                # Chunks of another prompt, checksummed and well formed, under the ticket of the pull.
                wrong = [
                    MemoryObj.from_kv(CacheKey(MODEL, "kv", 1, 0, h), torch.ones(2, 4, CHUNK, 64, dtype=torch.float16))
                    for h in chunk_hashes(PROMPT, CHUNK)[: len(args["hashes"]) // 32]
                ]
                answer = TcpChannel().send(args["address"], wrong, {"pull": args["pull"]}, token=WORKER)
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self) -> None:
        self.stop.set()
        self.server.server_close()


class P2PCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{free_port()}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                                 trust_env=False)
        port = self.url.rsplit(":", 1)[1]
        self.controller = subprocess.Popen(
            [sys.executable, "-c", "from kvstacks.cli import main; main()", "controller", "--host", "127.0.0.1",
             "--port", port, "--heartbeat-timeout", str(TIMEOUT), "--log-level", "warning"],
            env=_env(), stdout=subprocess.DEVNULL, stderr=open(tmp / "controller.log", "ab"),
        )
        self.workers: dict[str, Worker] = {}
        self.bad: list[BadPeer] = []

    def stack(self, instance: str, tiers: list[dict]) -> dict:
        return {
            "model": MODEL,
            "chunk_size": CHUNK,
            "stack": tiers,
            "controller": {"url": self.url, "instance_id": instance, "heartbeat_interval": HEARTBEAT,
                           "flush_interval": 0.01},
        }

    def wait(self, predicate, what: str, timeout: float = 30.0):
        return wait_for(predicate, what, timeout, retry_on=(httpx.HTTPError,))

    def lookup(self, tokens: list[int]) -> dict:
        return self.http.post("/lookup", json={"tokens": tokens}).json()["layout_info"]

    def close(self) -> None:
        for peer in self.bad:
            peer.close()
        for proc in [*(w.proc for w in self.workers.values()), self.controller]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        self.http.close()


@pytest.fixture(scope="module")
def p2p(tmp_path_factory):
    require("kvstacks_nixl", "pip install -e plugins/nixl")
    require("nixl._api", "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1")
    require("kvstacks_cpu", "pip install -e plugins/cpu")
    require("kvstacks_disk", "pip install -e plugins/disk")
    require("kvstacks_controller", "pip install -e controller")
    tmp = tmp_path_factory.mktemp("p2p")
    c = P2PCluster(tmp)
    try:
        c.workers["holder"] = Worker(tmp, "holder", c.stack("holder", [
            {"backend": "cpu", "capacity": "8MiB"},
            {"backend": "disk", "path": str(tmp / "holder-disk"), "capacity": "32MiB"},
        ]))
        c.workers["puller"] = Worker(tmp, "puller", c.stack("puller", [
            {"backend": "cpu", "capacity": "8MiB"},
            {"backend": "p2p", "timeout": 5.0},
        ]))
        c.wait(lambda: c.http.get("/health").status_code == 200, "controller start", timeout=120)
        for w in c.workers.values():
            w.ready()
        c.wait(lambda: c.http.get("/health").json()["healthy_workers"] == 2, "both workers registered")
        yield c
    finally:
        c.close()


def test_workers_advertise_nixl_first(p2p):
    for w in p2p.workers.values():
        assert list(w.info["transfer"]) == ["nixl", "tcp"]


def test_p2p_retrieve_pulls_from_the_peer_over_nixl_and_keeps_a_copy(p2p):
    holder, puller = p2p.workers["holder"], p2p.workers["puller"]
    assert holder.ask("store", PROMPT)["stored"] == len(PROMPT)
    p2p.wait(lambda: p2p.lookup(PROMPT).get("holder", [None, 0])[1] == len(PROMPT), "holder's chunks indexed")
    assert puller.ask("lookup_tiers", PROMPT)["tiers"] == {"cpu": 0, "p2p": len(PROMPT)}
    # A prompt that continues the cached one: the cached prefix comes from the peer.
    got = puller.ask("retrieve", PROMPT + [1, 2, 3])
    assert got == {"n": len(PROMPT), "exact": True}
    assert puller.ask("lookup_tiers", PROMPT)["tiers"]["cpu"] == len(PROMPT)
    p2p.wait(lambda: p2p.lookup(PROMPT).get("puller", [None, 0]) == ["cpu", len(PROMPT)], "puller's copy indexed")


def test_partial_local_prefix_pulls_only_the_rest(p2p):
    holder, puller = p2p.workers["holder"], p2p.workers["puller"]
    longer = PROMPT + list(range(6000, 6064))
    assert holder.ask("store", longer)["stored"] == 64
    p2p.wait(lambda: p2p.lookup(longer).get("holder", [None, 0])[1] == len(longer), "holder's chunks indexed")
    assert puller.ask("retrieve", longer) == {"n": len(longer), "exact": True}


def test_a_dead_peer_is_a_miss(p2p):
    puller = p2p.workers["puller"]
    p2p.bad.append(BadPeer(p2p.url, "ghost", GHOST, "dead"))
    assert puller.ask("lookup_tiers", GHOST)["tiers"]["p2p"] == len(GHOST)
    assert puller.ask("retrieve", GHOST) == {"n": 0, "exact": True}
    # The engine goes on serving what it has.
    assert puller.ask("retrieve", PROMPT) == {"n": len(PROMPT), "exact": True}


def test_a_peer_sending_other_chunks_is_a_miss(p2p):
    puller = p2p.workers["puller"]
    liar = BadPeer(p2p.url, "liar", OTHER, "liar")
    p2p.bad.append(liar)
    assert puller.ask("retrieve", OTHER) == {"n": 0, "exact": True}
    assert liar.calls == 1  # it was asked, and what it sent was refused
    assert puller.ask("lookup_tiers", OTHER)["tiers"]["cpu"] == 0


def test_move_over_nixl_between_instances(p2p):
    fresh = list(range(8000, 8048))
    holder = p2p.workers["holder"]
    assert holder.ask("store", fresh)["stored"] == len(fresh)
    p2p.wait(lambda: p2p.lookup(fresh).get("holder", [None, 0])[1] == len(fresh), "indexed")
    for channel in ({}, {"channel": "nixl"}):
        r = p2p.http.post("/move", json={
            "old_position": ["holder", "cpu"], "new_position": ["puller", "cpu"], "tokens": fresh, "copy": True,
            **channel,
        })
        assert r.status_code == 200, r.text
        event = p2p.wait(
            lambda: (s := p2p.http.post("/check_finish", json={"event_id": r.json()["event_id"]}).json())["status"]
            != "pending" and s, "move finished")
        assert event["status"] == "finished", event
        assert event["result"]["num_tokens"] == len(fresh)
    assert p2p.workers["puller"].ask("lookup_tiers", fresh)["tiers"]["cpu"] == len(fresh)


def test_peer_gone_for_good_leaves_the_copies(p2p):
    holder, puller = p2p.workers["holder"], p2p.workers["puller"]
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(10)
    assert puller.ask("retrieve", PROMPT) == {"n": len(PROMPT), "exact": True}
