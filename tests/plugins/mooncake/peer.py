"""Another engine process on the same Mooncake master, driven by lines on stdin.

    python peer.py MASTER PREFIX REPLICAS
    store SEED TOKENS    -> "stored N"   (KV random_kv(2, TOKENS, 64, fp16, seed=SEED) for tokens SEED*1000+i)
    lookup SEED TOKENS   -> "lookup N"
    quit
Its own segment holds whatever the master places there, so killing it takes those chunks away.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")

import torch  # noqa: E402
from kvstacks import CacheEngine  # noqa: E402
from kvstacks.testing import random_kv  # noqa: E402

CHUNK = 64


def prompt(seed: int, tokens: int) -> list[int]:
    return [seed * 1000 + i for i in range(tokens)]


def main() -> None:
    master, prefix, replicas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = CacheEngine.from_config({
        "model": "peer-test", "chunk_size": CHUNK,
        "stack": [{"backend": "mooncake", "master": master, "prefix": prefix, "replica_num": replicas,
                   "segment_bytes": "64MiB", "local_buffer_bytes": "16MiB", "read_buffer_bytes": "32MiB"}],
    })
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        seed, tokens = int(words[1]), int(words[2])
        if words[0] == "store":
            engine.store(prompt(seed, tokens), random_kv(2, tokens, 64, torch.float16, seed=seed))
            engine.flush()
            print("stored", engine.lookup(prompt(seed, tokens)), flush=True)
        elif words[0] == "lookup":
            print("lookup", engine.lookup(prompt(seed, tokens)), flush=True)
    engine.close()


if __name__ == "__main__":
    main()
