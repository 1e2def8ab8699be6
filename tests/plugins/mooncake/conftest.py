"""A real mooncake_master on free loopback ports for the tests, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kvstacks.testing import free_port, in_ci, require

HINT = "pip install kvstacks-mooncake (mooncake-transfer-engine-non-cuda) and apt-get install -y libibverbs1"

# what the plugin sets too: the transfer engine advertises loopback to the other processes
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")


def master_executable() -> str:
    beside_python = Path(sys.executable).parent / "mooncake_master"
    path = str(beside_python) if beside_python.exists() else shutil.which("mooncake_master")
    if path is None:
        message = f"mooncake_master is not installed; {HINT}"
        if in_ci():
            pytest.fail(f"{message} (CI=true: every dependency must be installed in CI)", pytrace=False)
        pytest.skip(message)
    return path


class MooncakeMaster:
    """One mooncake_master; ``stop``/``start`` keep its port so clients can come back to it."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> MooncakeMaster:
        require("mooncake.store", HINT)  # the binary needs the same shared libraries (libibverbs1)
        log = open(self.workdir / f"master-{self.port}.log", "ab")
        args = [master_executable(), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
                "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}", "--rpc_thread_num=4",
                *self.extra]
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                tail = (self.workdir / f"master-{self.port}.log").read_text(errors="replace").splitlines()[-3:]
                raise RuntimeError(f"mooncake_master on port {self.port} exited: {' | '.join(tail)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mooncake_master did not listen on port {self.port} within 15 s") from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.kill(process.pid, signal.SIGCONT)  # a paused master cannot handle a signal
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP, and wait until every thread has stopped: kill() returns before that, and under
        load a request sent right after it was still answered (seen in CI)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.monotonic() + 10
        while not all(_stopped(task / "stat") for task in tasks.iterdir()):
            assert time.monotonic() < deadline, "mooncake_master did not stop within 10 s of SIGSTOP"
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def _stopped(stat: Path) -> bool:
    try:
        # the state is the field after the command name, which ends with the last ')'
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (FileNotFoundError, ProcessLookupError):
        return True  # a thread that ended answers nothing either


@pytest.fixture(scope="session")
def mooncake_master(tmp_path_factory):
    """One master for the tests that do not stop it (they use unique keys or prefixes)."""
    master = MooncakeMaster(tmp_path_factory.mktemp("mooncake")).start()
    yield master
    master.stop()


@pytest.fixture
def own_master(tmp_path):
    """Masters this test alone uses, and may kill, pause or restart."""
    masters: list[MooncakeMaster] = []

    def make(*extra: str, port: int | None = None, start: bool = True) -> MooncakeMaster:
        master = MooncakeMaster(tmp_path / f"m{len(masters)}", *extra, port=port)
        masters.append(master)
        return master.start() if start else master

    yield make
    for master in masters:
        master.stop()
