"""The example router (contrib/router) in front of two real OpenAI-compatible servers.

Each server is ``kvstacks_transformers.openai_server``: the real SmolLM2 model with a
kvstacks CPU tier reporting to a real controller. Requests sent through the router
must land on the instance that holds their prefix (the server's own
``x-kvstacks-instance`` header and its cached-token count say where they ran).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kvstacks.testing import free_port, require

ADMIN = "router-admin"
CHUNK = 32

pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(900)]


def _doc(topic: str, n: int = 14) -> str:
    return f"Notes on {topic}. " + " ".join(
        f"Observation {i}: the {topic} in row {i} was measured at {i * 7 % 13} units." for i in range(n)
    )


DOC_A = _doc("apple orchard")
DOC_B = _doc("tide pools")


def _env() -> dict[str, str]:
    env = dict(os.environ, KVSTACKS_ADMIN_TOKEN=ADMIN, PYTHONUNBUFFERED="1")
    env.pop("KVSTACKS_LOAD_PLUGINS", None)
    env.pop("KVSTACKS_WORKER_TOKEN", None)
    return env


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, *args], env=_env(), stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"{name}.log", "ab")
        )
        self.procs.append(proc)
        return proc

    def wait_http(self, name: str, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"{name} (or another process) died: {(self.tmp / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{name} did not answer at {url}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require("kvstacks_router", "pip install -e contrib/router")
    require("kvstacks_transformers", "pip install -e contrib/transformers")
    require("gguf", "pip install gguf")
    from kvstacks_transformers.smollm2 import model_folder

    model_folder()  # fails with the install hint when the model is missing
    tmp = tmp_path_factory.mktemp("router")
    procs = Processes(tmp)
    ports = {name: free_port() for name in ("controller", "inst-a", "inst-b", "router")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        procs.start(
            "controller", "-c", "from kvstacks.cli import main; main()", "controller",
            "--port", str(ports["controller"]), "--log-level", "warning",
        )  # fmt: skip
        for name in ("inst-a", "inst-b"):
            stack = {
                "model": "smollm2-135m",
                "chunk_size": CHUNK,
                "stack": [{"backend": "cpu", "capacity": "512MiB"}],
                "controller": {"url": urls["controller"], "instance_id": name, "heartbeat_interval": 0.5},
            }
            path = tmp / f"{name}.yaml"
            path.write_text(json.dumps(stack))  # JSON is YAML
            procs.start(name, "-m", "kvstacks_transformers.openai_server", "--stack", str(path), "--port", str(ports[name]))
        procs.start(
            "router", "-m", "kvstacks_router", "--controller", urls["controller"], "--port", str(ports["router"]),
            "--backend", f"inst-a={urls['inst-a']}", "--backend", f"inst-b={urls['inst-b']}",
            "--route-timeout", "5",
        )  # fmt: skip
        for name in ("controller", "router", "inst-a", "inst-b"):
            procs.wait_http(name, urls[name] + "/health", timeout=600)
        yield urls, procs
    finally:
        procs.close()


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra}, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r


def wait_indexed(urls: dict[str, str], name: str, what: dict) -> None:
    """Until the controller says instance ``name`` holds at least a chunk of this prompt."""
    tokens = httpx.post(f"{urls[name]}/tokenize", json=what, trust_env=False).json()["tokens"]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + 20
    while True:
        r = httpx.post(f"{urls['controller']}/lookup", json={"tokens": tokens}, headers=auth, trust_env=False)
        if r.json()["layout_info"].get(name, [None, 0])[1] >= CHUNK:
            return
        assert time.monotonic() < deadline, f"{name}'s chunks never reached the controller: {r.text}"
        time.sleep(0.1)


def test_requests_land_where_their_prefix_is(fleet):
    urls, procs = fleet
    # Warm each instance directly with its own document.
    assert complete(urls["inst-a"], DOC_A + " Question: which row?").headers["x-kvstacks-instance"] == "inst-a"
    assert complete(urls["inst-b"], DOC_B + " Question: which row?").headers["x-kvstacks-instance"] == "inst-b"
    for name, doc in (("inst-a", DOC_A), ("inst-b", DOC_B)):
        wait_indexed(urls, name, {"prompt": doc})

    # Through the router, a new question on each document goes where the document is cached.
    for doc, name in ((DOC_A, "inst-a"), (DOC_B, "inst-b"), (DOC_A, "inst-a"), (DOC_B, "inst-b")):
        r = complete(urls["router"], doc + " Question: what was measured in row 3?")
        assert r.headers["x-kvstacks-routed-to"] == r.headers["x-kvstacks-instance"] == name
        assert int(r.headers["x-kvstacks-matched-tokens"]) >= CHUNK
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= CHUNK  # the prefix was reused

    # A new conversation sticks to the instance that served its first turn.
    system = {"role": "system", "content": _doc("glacier", 10)}
    chat = {"messages": [system, {"role": "user", "content": "Summarize."}], "max_tokens": 2}
    first = httpx.post(f"{urls['router']}/v1/chat/completions", json=chat, timeout=120, trust_env=False)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["role"] == "assistant"
    home = first.headers["x-kvstacks-instance"]
    wait_indexed(urls, home, {"messages": chat["messages"]})
    chat["messages"][1]["content"] = "Which row was largest?"
    again = httpx.post(f"{urls['router']}/v1/chat/completions", json=chat, timeout=120, trust_env=False)
    assert again.headers["x-kvstacks-instance"] == home
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= CHUNK

    # The controller gone: requests still go through, by load.
    procs.procs[0].kill()
    procs.procs[0].wait(10)
    r = complete(urls["router"], "Unrelated: count to three.")
    assert r.headers["x-kvstacks-routed-to"] in ("inst-a", "inst-b")
    assert httpx.get(f"{urls['router']}/health", trust_env=False).json()["fallback"] >= 1

    # A bad body gets the backend's 400, passed through.
    r = httpx.post(f"{urls['router']}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30, trust_env=False)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
