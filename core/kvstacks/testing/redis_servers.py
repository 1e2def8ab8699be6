"""Real redis-server processes on loopback for tests: standalone, cluster, sentinel, TLS.

Each is started daemonized with a pidfile and stopped by that PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from kvstacks.testing.environment import free_port, require_executable

HINT = "apt-get install -y redis-server"


def executables() -> tuple[str, str]:
    return require_executable("redis-server", HINT), require_executable("redis-cli", HINT)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, as cluster mode needs."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


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

    def start(self) -> RedisServer:
        server, _ = executables()
        self.pidfile.unlink(missing_ok=True)
        common = ["--port", str(self.port), "--bind", "127.0.0.1"]
        if self.sentinel:
            conf = self.workdir / f"sentinel-{self.port}.conf"
            conf.write_text("\n".join(self.extra) + "\n")
            args = [server, str(conf), "--sentinel"] + common
        else:
            # the test's own options come last: they win over these defaults
            args = [server] + common + ["--save", "", "--appendonly", "no"] + self.extra
        args += [
            "--daemonize", "yes", "--pidfile", str(self.pidfile),
            "--dir", str(self.workdir), "--logfile", str(self.workdir / f"redis-{self.port}.log"),
        ]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                pid = int(self.pidfile.read_text())
                try:
                    os.kill(pid, 0)
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                log = self.workdir / f"redis-{self.port}.log"
                tail = log.read_text().splitlines()[-3:] if log.exists() else []
                raise RuntimeError(f"redis-server on port {self.port} did not start: {' | '.join(tail)}")
            time.sleep(0.02)
        self.pid = int(self.pidfile.read_text())
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        # SIGKILL by default: these servers persist nothing, and a clean SIGTERM exit
        # takes redis 1-2 s, which adds up over a test session.
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.01)

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
                        "--cluster-config-file", "nodes.conf", port=cluster_port())
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        _, cli = executables()
        try:
            self._start(cli)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, cli: str) -> None:
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
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisWithSentinel:
    """A master (and optionally a replica) and one sentinel watching it under the name ``mymaster``."""

    def __init__(self, workdir: Path, replica: bool = False, down_after_ms: int = 5000) -> None:
        self.master = RedisServer(workdir / "master")
        self.replica = (
            RedisServer(workdir / "replica", "--replicaof", "127.0.0.1", str(self.master.port)) if replica else None
        )
        port = free_port()
        self.sentinel = RedisServer(
            workdir / "sentinel",
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds mymaster {down_after_ms}",
            "sentinel failover-timeout mymaster 5000",
            port=port,
            sentinel=True,
        )

    def start(self) -> RedisWithSentinel:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.master.start()
        if self.replica is not None:
            self.replica.start()
            deadline = time.monotonic() + 20
            while "master_link_status:up" not in self.replica.cli("INFO", "replication"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync with the master")
                time.sleep(0.05)
        self.sentinel.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = self.sentinel.cli("sentinel", "get-master-addr-by-name", "mymaster")
            if str(self.master.port) in out and (
                self.replica is None or "num-slaves\n1" in self.sentinel.cli("SENTINEL", "MASTER", "mymaster")
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinel does not know the master")

    def stop(self) -> None:
        self.sentinel.stop()
        self.master.stop()
        if self.replica is not None:
            self.replica.stop()
