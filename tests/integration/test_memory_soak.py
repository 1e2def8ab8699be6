"""Memory stays inside what the YAML says: eight threads on a 3 MiB cpu tier over a 12 MiB disk tier.

The soak runs in a fresh process (soak_child.py) so its RSS is its own. On the main of issue
10 the 1 GiB default offload queue held cpu buffers of chunks already evicted and the pool kept
them idle afterwards: RSS grew by hundreds of MB here (GBs with larger chunks), and stayed after
close(). The bound asserted: the cpu tier's capacity, plus the offload queue's budget (sized from
it), plus what eight threads have in hand (a prompt's KV out, its copies in flight and its read
buffers: four 1 MiB prompts each), plus 48 MiB of allocator slack. It also checks that the
cpu backend holds exactly what its tier accounts (a chunk evicted while its put was in flight
used to stay in the backend for good), that the cpu pool keeps at most the cpu tier's capacity
idle and the disk tier's idle read/write buffers at most the disk tier's capacity.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
CPU_CAPACITY, DISK_CAPACITY = 3 * MiB, 12 * MiB
THREADS, PROMPT = 8, 1 * MiB


def test_rss_stays_within_the_tiers_plus_the_queue_and_goes_back_on_close(tmp_path):
    child = Path(__file__).with_name("soak_child.py")
    run = subprocess.run([sys.executable, str(child), str(tmp_path), "2.5", "through", "back"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    for r in json.loads(run.stdout)["results"]:
        mode = r["mode"]
        assert not r["errors"], (mode, r["errors"])
        assert r["queue_bytes"] == CPU_CAPACITY, "the offload queue is sized from the top tier by default"
        assert r["cpu_bytes"] <= CPU_CAPACITY and r["disk_bytes"] <= DISK_CAPACITY
        assert r["cpu_backend_bytes"] == r["cpu_bytes"], f"{mode}: the cpu backend holds chunks its tier forgot"
        assert r["pool_idle"] <= CPU_CAPACITY, f"{mode}: the cpu pool keeps {r['pool_idle'] / MiB:.1f} MiB idle"
        assert r["disk_idle"] <= DISK_CAPACITY, f"{mode}: the disk tier keeps {r['disk_idle'] / MiB:.1f} MiB of idle buffers"
        bound = CPU_CAPACITY + r["queue_bytes"] + THREADS * 4 * PROMPT + 48 * MiB
        growth = r["peak"] - r["before"]
        assert growth <= bound, f"{mode}: RSS grew {growth / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
        assert r["after_close"] <= r["before"] + 16 * MiB, \
            f"{mode}: {(r['after_close'] - r['before']) / MiB:.0f} MiB more than before the soak after close()"
