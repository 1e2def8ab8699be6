"""Real redis-server processes on loopback for the tests: standalone, cluster, sentinel, TLS.

Each is started daemonized with a pidfile and stopped by that PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from kvstacks.testing import free_port, require_executable

HINT = "apt-get install -y redis-server"


def executables() -> tuple[str, str]:
    return require_executable("redis-server", HINT), require_executable("redis-cli", HINT)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis on port {port} did not come up")


class RedisServer:
    """One redis-server; ``stop``/``start`` keep the port so clients can come back to it."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None, sentinel: bool = False) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = list(extra)
        self.sentinel = sentinel
        self.pidfile = workdir / f"redis-{self.port}.pid"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        server, _ = executables()
        self.pidfile.unlink(missing_ok=True)
        if self.sentinel:
            conf = self.workdir / f"sentinel-{self.port}.conf"
            conf.write_text("\n".join(self.extra) + "\n")
            args = [server, str(conf), "--sentinel"]
            common = ["--port", str(self.port)]
        else:
            args = [server] + self.extra
            common = ["--port", str(self.port), "--save", "", "--appendonly", "no"]
        args += common + [
            "--bind", "127.0.0.1", "--daemonize", "yes", "--pidfile", str(self.pidfile),
            "--dir", str(self.workdir), "--logfile", str(self.workdir / f"redis-{self.port}.log"),
        ]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        if "--port" in self.extra and self.extra[self.extra.index("--port") + 1] == "0":
            pass  # TCP disabled (TLS-only or unix-only): wait on the pidfile alone
        else:
            _wait_port(self.port)
        deadline = time.monotonic() + 10
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} wrote no pidfile")
            time.sleep(0.02)
        self.pid = int(self.pidfile.read_text())
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    def cli(self, *args: str) -> str:
        _, cli = executables()
        return subprocess.run([cli, "-p", str(self.port), *args], check=True, capture_output=True, text=True).stdout


class RedisCluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(workdir / f"node{i}", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                        "--cluster-config-file", "nodes.conf")
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> "RedisCluster":
        _, cli = executables()
        for node in self.nodes:
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisWithSentinel:
    """A master and one sentinel watching it under the name ``mymaster``."""

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master")
        port = free_port()
        self.sentinel = RedisServer(
            workdir / "sentinel",
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1",
            "sentinel down-after-milliseconds mymaster 5000",
            port=port,
            sentinel=True,
        )

    def start(self) -> "RedisWithSentinel":
        self.master.start()
        self.sentinel.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = self.sentinel.cli("sentinel", "get-master-addr-by-name", "mymaster")
            if str(self.master.port) in out:
                return self
            time.sleep(0.1)
        raise RuntimeError("the sentinel does not know the master")

    def stop(self) -> None:
        self.sentinel.stop()
        self.master.stop()
