"""NIXL channel and P2P retrieve speed, against baselines measured in the same run.

1. Channel: one chunk of 8 and 32 MiB from this process to a peer process.
   Baseline: raw NIXL, both buffers registered once, one WRITE with a notification,
   the peer acknowledging over TCP once it sees the notification (what "arrived"
   means for our channel too), both sides waiting as the channel does (``wait_until``: a short
   spin, then sleeps). Compared: ``nixl`` channel ``send`` (its open control connection, the
   receiver's plan, registration, the peer's ``receive`` answering) and the ``tcp`` channel.
   Goal: nixl channel >= 70% of raw.
2. P2P retrieve: a prompt of ``--chunks`` chunks of SmolLM2-sized KV (256 tokens x
   23,040 bytes) held in the CPU tier of a worker process, retrieved by an engine whose
   only tier is ``p2p`` (so every retrieve pulls: controller lookup + transfer), over
   nixl and over tcp, against an engine reading the same chunks from its local
   ``disk`` tier (O_DIRECT where the filesystem allows it, so no page cache).

Medians of ``--rounds``; the order of the systems rotates every round.

    python benchmarks/nixl_p2p.py [--rounds 15] [--chunks 8] [--only channel|p2p]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KVSTACKS_WORKER_TOKEN", "bench-" + os.urandom(8).hex())
os.environ.setdefault("KVSTACKS_ADMIN_TOKEN", "bench-" + os.urandom(8).hex())

import torch  # noqa: E402  (before nixl, which is handed tensors)
from kvstacks_nixl.channel import ucx_environment  # noqa: E402

# Before this process's first NIXL agent (the raw one comes before the channel's) and for the
# child processes, which inherit it: loopback, and no EFA module, whose second libnl would crash
# every process here at exit.
ucx_environment()

MiB = 1 << 20
SIZES = (8 * MiB, 32 * MiB)
CHUNK_TOKENS, LAYERS, HIDDEN = 256, 30, 192  # SmolLM2-135M: 30 layers, 3 KV heads x 64
_LEN = struct.Struct("<I")


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv(sock: socket.socket) -> bytes:
    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise EOFError("peer closed")
            buf += part
        return bytes(buf)

    return exact(_LEN.unpack(exact(4))[0])


def _agent(name: str):
    import logging

    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    logging.getLogger("nixl").setLevel(logging.WARNING)
    return agent


# ---------------------------------------------------------------- the peer process


def peer() -> None:
    """Raw NIXL target plus nixl and tcp channel receivers; serves until stdin closes."""
    from kvstacks.builtin.transfer import TcpChannel
    from kvstacks_nixl import NixlChannel
    from kvstacks_nixl.channel import wait_until

    def receive(objs, meta):
        return {"num_tokens": sum(o.num_tokens for o in objs)}

    token = os.environ["KVSTACKS_WORKER_TOKEN"]
    channels = {"nixl": NixlChannel(), "tcp": TcpChannel()}
    addresses = {name: ch.listen("127.0.0.1", 0, receive, token) for name, ch in channels.items()}
    agent = _agent("bench-target")
    buffers = {n: torch.zeros(n, dtype=torch.uint8) for n in SIZES}
    regs = [agent.register_memory(b) for b in buffers.values()]
    server = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"raw": server.getsockname()[1], **addresses}), flush=True)
    conn, _ = server.accept()
    initiator = agent.add_remote_agent(_recv(conn))
    initiator = initiator.decode() if isinstance(initiator, bytes) else initiator
    _send(conn, agent.get_agent_metadata())
    _send(conn, json.dumps({str(n): b.data_ptr() for n, b in buffers.items()}).encode())
    while True:
        try:
            tag = _recv(conn)
        except EOFError:
            break
        assert wait_until(lambda: tag in agent.get_new_notifs().get(initiator, []), time.monotonic() + 60)
        _send(conn, b"ok")
    for reg in regs:
        agent.deregister_memory(reg)
    sys.stdin.read()


def raw_initiator(port: int):
    """Returns ``write(nbytes) -> seconds`` over pre-registered buffers."""
    from kvstacks_nixl.channel import wait_until

    agent = _agent("bench-initiator")
    conn = socket.create_connection(("127.0.0.1", port))
    _send(conn, agent.get_agent_metadata())
    target = agent.add_remote_agent(_recv(conn))
    remote = {int(k): v for k, v in json.loads(_recv(conn)).items()}
    plans = {}
    for n in SIZES:
        src = torch.ones(n, dtype=torch.uint8)
        agent.register_memory(src)
        plans[n] = (src, agent.get_xfer_descs(src), agent.get_xfer_descs([(remote[n], n, 0)], "DRAM"))
    counter = [0]

    def write(n: int) -> float:
        _, local, far = plans[n]
        counter[0] += 1
        tag = f"w{counter[0]}".encode()
        started = time.perf_counter()
        _send(conn, tag)
        handle = agent.initialize_xfer("WRITE", local, far, target, tag)
        state = [agent.transfer(handle)]

        def ended() -> bool:
            if state[0] not in ("DONE", "ERR"):
                state[0] = agent.check_xfer_state(handle)
            return state[0] in ("DONE", "ERR")

        assert wait_until(ended, time.monotonic() + 60) and state[0] == "DONE", "raw NIXL write failed"
        _recv(conn)
        elapsed = time.perf_counter() - started
        agent.release_xfer_handle(handle)
        return elapsed

    return write


def read_json_line(proc: subprocess.Popen) -> dict:
    """The child's next JSON line; NIXL and UCX may print their own lines to stdout first."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args} exited (code {proc.poll()}) before answering")
        if line.startswith("{"):
            return json.loads(line)
        print("  (child said)", line.rstrip())


def bench_channels(rounds: int) -> None:
    from kvstacks.builtin.transfer import TcpChannel
    from kvstacks.keys import CacheKey
    from kvstacks.memory import MemoryObj
    from kvstacks_nixl import NixlChannel

    proc = subprocess.Popen([sys.executable, __file__, "--role", "peer"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        info = read_json_line(proc)
        write = raw_initiator(info["raw"])
        token = os.environ["KVSTACKS_WORKER_TOKEN"]
        nixl, tcp = NixlChannel(), TcpChannel()
        print("## channel: one chunk to another process, median of", rounds)
        print(f"{'size':>8} {'raw NIXL':>16} {'nixl channel':>22} {'tcp channel':>22}")
        for n in SIZES:
            tokens = n // (2 * 4 * 1024 * 2)
            obj = MemoryObj.from_kv(CacheKey("bench", "kv", 1, 0, b"\x01" * 16),
                                    torch.ones(2, 4, tokens, 1024, dtype=torch.float16))
            systems = {
                "raw": lambda: write(n),
                "nixl": lambda: _timed(lambda: nixl.send(info["nixl"], [obj], {}, token=token)),
                "tcp": lambda: _timed(lambda: tcp.send(info["tcp"], [obj], {}, token=token)),
            }
            times = _rotate(systems, rounds)
            raw = statistics.median(times["raw"])
            cells = [f"{n / raw / 1e9:6.2f} GB/s {raw * 1e3:6.2f} ms"]
            for name in ("nixl", "tcp"):
                t = statistics.median(times[name])
                cells.append(f"{n / t / 1e9:6.2f} GB/s {t * 1e3:6.2f} ms {raw / t:5.0%}")
            print(f"{n // MiB:>5} MiB  " + "  ".join(cells))
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(10)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _rotate(systems: dict, rounds: int) -> dict[str, list[float]]:
    names = list(systems)
    for name in names:  # warm up: connections, registrations, pools
        systems[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(systems[name]())
    return times


# ---------------------------------------------------------------- P2P retrieve


def holder(spec: str) -> None:
    from kvstacks import CacheEngine

    config = json.loads(spec)
    engine = CacheEngine.from_config(config["stack"])
    engine.store(config["tokens"], _kv(len(config["tokens"])))
    print(json.dumps({"stored": True}), flush=True)
    sys.stdin.read()
    engine.close()


def _kv(tokens: int) -> torch.Tensor:
    return torch.sin(torch.arange(2 * LAYERS * tokens * HIDDEN, dtype=torch.float32)).view(
        2, LAYERS, tokens, HIDDEN).to(torch.float16)


def bench_p2p(rounds: int, chunks: int) -> None:
    import httpx
    from kvstacks import CacheEngine
    from kvstacks.testing import free_port

    tokens = list(range(10, 10 + chunks * CHUNK_TOKENS))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="kvstacks-p2p-bench-")
    controller = subprocess.Popen(
        [sys.executable, "-c", "from kvstacks.cli import main; main()", "controller", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], stdout=subprocess.DEVNULL)

    def stack(instance: str, tiers: list) -> dict:
        return {"model": "bench", "chunk_size": CHUNK_TOKENS, "stack": tiers,
                "controller": {"url": url, "instance_id": instance, "heartbeat_interval": 0.5}}

    spec = {"stack": stack("holder", [{"backend": "cpu", "capacity": "2GiB"}]), "tokens": tokens}
    worker = subprocess.Popen([sys.executable, __file__, "--role", "holder", "--spec", json.dumps(spec)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    engines = {}
    try:
        assert read_json_line(worker)["stored"]
        engines["disk"] = CacheEngine.from_config({
            "model": "bench", "chunk_size": CHUNK_TOKENS,
            "stack": [{"backend": "disk", "path": tmp, "capacity": "4GiB"}]})
        engines["disk"].store(tokens, _kv(len(tokens)))
        engines["disk"].flush()
        for channel in ("nixl", "tcp"):
            engines[f"p2p {channel}"] = CacheEngine.from_config(
                stack(f"puller-{channel}", [{"backend": "p2p", "channel": channel}]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            layout = httpx.post(url + "/lookup", json={"tokens": tokens}, trust_env=False,
                                headers={"Authorization": "Bearer " + os.environ.get("KVSTACKS_ADMIN_TOKEN", "")})
            if layout.status_code == 200 and layout.json()["layout_info"].get("holder", [0, 0])[1] == len(tokens):
                break
            time.sleep(0.1)
        out = torch.empty(2, LAYERS, len(tokens), HIDDEN, dtype=torch.float16)
        expected = _kv(len(tokens))
        for name, engine in engines.items():
            kv, n = engine.retrieve(tokens, out=out)
            assert n == len(tokens) and torch.equal(kv, expected), f"{name} retrieved {n} of {len(tokens)} tokens"

        def retrieve(engine):
            return lambda: _timed(lambda: engine.retrieve(tokens, out=out))

        times = _rotate({name: retrieve(e) for name, e in engines.items()}, rounds)
        nbytes = expected.numel() * 2
        disk = statistics.median(times["disk"])
        print(f"\n## P2P retrieve: {chunks} chunks of {CHUNK_TOKENS} tokens ({nbytes / MiB:.0f} MiB), median of {rounds}")
        for name in engines:
            t = statistics.median(times[name])
            print(f"{name:>10}: {t * 1e3:7.1f} ms {nbytes / t / 1e9:6.2f} GB/s  {disk / t:5.2f}x disk")
    finally:
        for engine in engines.values():
            engine.close()
        worker.stdin.close()
        for proc in (worker, controller):
            proc.kill()
            proc.wait(10)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["peer", "holder"])
    parser.add_argument("--spec")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--only", choices=["channel", "p2p"])
    args = parser.parse_args()
    if args.role == "peer":
        return peer()
    if args.role == "holder":
        return holder(args.spec)
    if args.only != "p2p":
        bench_channels(args.rounds)
    if args.only != "channel":
        bench_p2p(args.rounds, args.chunks)


if __name__ == "__main__":
    main()
