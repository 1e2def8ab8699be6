"""Two real processes on one directory: writes, reads, removes and clears of the same keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kvstacks import frame
from kvstacks_disk import layout

WORKER = textwrap.dedent('''
    import asyncio, os, sys, torch
    from kvstacks.keys import CacheKey
    from kvstacks.memory import MemoryObj
    from kvstacks_disk import DiskBackend

    root, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    KEYS = [CacheKey("shared", "kv", 1, 0, bytes([i]) * 16) for i in range(8)]

    def version(key, writer, n):
        # Every byte of a version is determined by (key, writer, n): a torn or mixed
        # file cannot pass the check below even if it passed the checksum.
        fill = (key.chunk_hash[0] * 31 + writer * 7 + n) % 251
        data = torch.full((2, 2, 64, 128), fill, dtype=torch.uint8).view(torch.float16)
        return MemoryObj(key, data, tuple(data.shape), torch.float16)

    async def main():
        disk = DiskBackend(DiskBackend.Options(path=root))
        await disk.start()
        bad = 0
        for n in range(rounds):
            for i, key in enumerate(KEYS):
                op = (n + i + me) % 5
                if op < 2:
                    await disk.put(key, version(key, me, n))
                elif op < 4:
                    got = await disk.get(key)
                    if got is not None:
                        raw = got.data.view(torch.uint8)
                        if not bool((raw == raw.view(-1)[0]).all()):
                            bad += 1
                else:
                    await disk.remove(key)
            if n % 40 == 39:
                await disk.clear()
        print(f"bad={bad} corrupt={disk.corrupt_count}")

    asyncio.run(main())
''')


def test_two_processes_never_see_or_leave_a_torn_chunk(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), str(i), "150"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert out.strip() == "bad=0 corrupt=0", f"a process read a torn or corrupt chunk: {out} {err[-2000:]}"
    names = [f for _, _, fs in os.walk(root) for f in fs]
    assert not [n for n in names if layout.is_temp(n)], "a temp file was left behind"
    for directory, _, fs in os.walk(root):
        for name in fs:
            with open(os.path.join(directory, name), "rb") as f:
                frame.decode(bytearray(f.read()))  # raises CorruptChunk if anything is torn
