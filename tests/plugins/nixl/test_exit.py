"""Processes that used the nixl channel exit cleanly: a sender and a receiver, each in its own
process with its own real NIXL agent, transfer one chunk and exit, with and without close().

UCX loads its EFA module, which needs the system's libefa; that one links the system's
libibverbs and libnl-route beside the copies the nixl-cu12 wheel bundles, and at exit one
copy's destructor crashed in the other's code (SIGSEGV, exit code 139), after all the work was
done. pytest's own exit code hides nothing here: each side runs as a child and its code is
asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from kvstacks.testing import require

TOKEN = "worker-secret"

RECEIVER = textwrap.dedent("""
    import json, sys, threading
    from kvstacks_nixl import NixlChannel

    close = sys.argv[1] == "close"
    arrived = threading.Event()

    def receive(objs, meta):
        arrived.set()
        return {"num_tokens": sum(o.num_tokens for o in objs)}

    channel = NixlChannel()
    print(json.dumps({"address": channel.listen("127.0.0.1", 0, receive, sys.argv[2])}), flush=True)
    assert arrived.wait(60), "no transfer arrived"
    sys.stdin.read()  # the sender has its answer once the test closes this
    if close:
        channel.close()
""")

SENDER = textwrap.dedent("""
    import sys
    import torch
    from kvstacks.keys import CacheKey
    from kvstacks.memory import MemoryObj
    from kvstacks_nixl import NixlChannel

    close, address, token = sys.argv[1] == "close", sys.argv[2], sys.argv[3]
    channel = NixlChannel()
    obj = MemoryObj.from_kv(CacheKey("m", "kv", 1, 0, b"\\x01" * 16), torch.ones(2, 3, 16, 64, dtype=torch.float16))
    assert channel.send(address, [obj], {}, token=token) == {"num_tokens": 16}
    if close:
        channel.close()
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # What the channel does about UCX's modules is under test: not what this shell says.
    env.pop("UCX_MODULES", None)
    return env


@pytest.mark.parametrize("close", ["close", "no-close"])
def test_sender_and_receiver_processes_exit_with_code_0(close):
    require("nixl._api", "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1")
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, close, TOKEN], env=_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = receiver.stdout.readline()
        assert line, f"receiver died: {receiver.stderr.read()[-3000:]}"
        address = json.loads(line)["address"]
        sender = subprocess.run(
            [sys.executable, "-c", SENDER, close, address, TOKEN], env=_env(),
            capture_output=True, text=True, timeout=120,
        )
        _, err = receiver.communicate("", timeout=60)
        codes = {"sender": sender.returncode, "receiver": receiver.returncode}
        assert codes == {"sender": 0, "receiver": 0}, f"{codes}\n{sender.stderr[-2000:]}\n{err[-2000:]}"
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
