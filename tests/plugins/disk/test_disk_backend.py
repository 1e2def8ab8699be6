"""The disk backend: conformance, corruption, restart, start-up errors, stale temp files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from kvstacks import frame
from kvstacks.config import build_options
from kvstacks.errors import ConfigError
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.plugins import registry
from kvstacks.testing import BackendConformance, assert_same_obj, random_key, random_kv, raw_obj
from kvstacks_disk import DiskBackend, chunk_path
from kvstacks_disk import backend as disk_module


class TestDiskConformance(BackendConformance):
    o_direct: bool | None = None
    frames = True

    @pytest_asyncio.fixture
    async def backend(self, tmp_path: Path) -> DiskBackend:
        backend = DiskBackend(DiskBackend.Options(path=tmp_path / "chunks", o_direct=self.o_direct))
        await backend.start()
        return backend

    def corrupt(self, backend: DiskBackend, key: CacheKey) -> None:
        path = chunk_path(backend.root, key)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))


class TestDiskBufferedConformance(TestDiskConformance):
    o_direct = False


def files(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_registered_under_disk() -> None:
    assert registry().get("backends", "disk") is DiskBackend


def test_options_need_a_path() -> None:
    with pytest.raises(ConfigError, match=r"stack\[1\]\.path: is required"):
        build_options(DiskBackend.Options, {}, "stack[1]")
    options = build_options(DiskBackend.Options, {"path": "~/kv", "fsync": True}, "stack[1]")
    assert options.path == Path(os.path.expanduser("~/kv")) and options.fsync is True


async def test_files_hold_the_chunk_format_and_no_temp_file_remains(disk: DiskBackend) -> None:
    key = random_key()
    obj = raw_obj(key, random_kv(seed=1))
    await disk.put(key, obj)
    [path] = files(disk.root)
    assert path == chunk_path(disk.root, key)
    with open(path, "rb") as f:
        assert_same_obj(frame.decode(bytearray(f.read()), expect_key=key), obj)


@pytest.mark.parametrize("damage", ["truncate", "empty", "bad_magic", "flip_payload", "append"])
async def test_damaged_file_is_a_counted_miss_and_removed(disk: DiskBackend, damage: str, caplog) -> None:
    key = random_key()
    await disk.put(key, raw_obj(key, random_kv(seed=2)))
    path = chunk_path(disk.root, key)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(size - 100)
        elif damage == "empty":
            f.truncate(0)
        elif damage == "bad_magic":
            f.write(b"XXXX")
        elif damage == "flip_payload":
            f.seek(size - 50)
            f.write(b"\xff\x00\xff")
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"trailing")
    with caplog.at_level("WARNING", logger="kvstacks.disk"):
        assert await disk.get(key) is None
    assert disk.corrupt_count == 1
    assert not os.path.exists(path)
    assert "corrupt" in caplog.text and path in caplog.text
    assert await disk.get(key) is None
    assert disk.corrupt_count == 1, "a missing file is a plain miss, not another corrupt chunk"


async def test_a_file_holding_another_key_is_not_served(disk: DiskBackend) -> None:
    key, other = random_key(), random_key()
    await disk.put(other, raw_obj(other, random_kv(seed=3)))
    os.makedirs(os.path.dirname(chunk_path(disk.root, key)), exist_ok=True)
    os.replace(chunk_path(disk.root, other), chunk_path(disk.root, key))
    assert await disk.get(key) is None
    assert disk.corrupt_count == 1


async def test_restart_sees_every_chunk(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    first = DiskBackend(DiskBackend.Options(path=root))
    await first.start()
    objs = {}
    for i, model in enumerate(["m1", "org/m2", "m1"]):
        key = random_key(model=model, rank=i % 2, world_size=2)
        objs[key] = raw_obj(key, random_kv(1, 8 + i, 32, seed=10 + i))
        await first.put(key, objs[key])
    await first.close()

    second = DiskBackend(DiskBackend.Options(path=root))
    await second.start()
    listed = {key: size async for key, size in second.keys()}
    assert set(listed) == set(objs)
    for key, obj in objs.items():
        assert listed[key] == frame.frame_size(obj)
        assert_same_obj(await second.get(key), obj, "after restart")


async def test_keys_ignore_temp_and_foreign_files_and_clear_leaves_them(disk: DiskBackend) -> None:
    key = random_key()
    await disk.put(key, raw_obj(key, random_kv(seed=4)))
    shard = os.path.dirname(chunk_path(disk.root, key))
    fresh_temp = os.path.join(shard, f".{os.path.basename(chunk_path(disk.root, key))}.1.ab.tmp")
    foreign = os.path.join(disk.root, "README.txt")
    foreign_in_shard = os.path.join(shard, "notes.kvc.bak")
    for path in (fresh_temp, foreign, foreign_in_shard):
        Path(path).write_bytes(b"not a chunk")
    assert [k async for k, _ in disk.keys()] == [key]
    await disk.clear()
    assert [k async for k, _ in disk.keys()] == []
    for path in (fresh_temp, foreign, foreign_in_shard):
        assert os.path.exists(path), f"clear() removed {path}, which it did not write"


async def test_stale_temp_files_are_removed_at_scan(disk: DiskBackend) -> None:
    key = random_key()
    await disk.put(key, raw_obj(key, random_kv(seed=5)))
    shard = os.path.dirname(chunk_path(disk.root, key))
    stale = os.path.join(shard, ".x.kvc.999.dead.tmp")
    fresh = os.path.join(shard, ".y.kvc.999.beef.tmp")
    for path in (stale, fresh):
        Path(path).write_bytes(b"half a chunk")
    old = time.time() - 2 * disk_module.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    [_ async for _ in disk.keys()]
    assert not os.path.exists(stale)
    assert os.path.exists(fresh), "a temp file of a live writer must survive"


async def test_scan_with_progress_bar_threshold_crossed(disk: DiskBackend, monkeypatch) -> None:
    monkeypatch.setattr(disk_module, "PROGRESS_THRESHOLD", 2)
    keys = [random_key() for _ in range(12)]
    for key in keys:
        await disk.put(key, raw_obj(key, random_kv(1, 2, 8, seed=6)))
    assert sorted(k.chunk_hash for k, _ in disk.scan()) == sorted(k.chunk_hash for k in keys)


async def test_fsync_option_writes_durably(tmp_path: Path) -> None:
    backend = DiskBackend(DiskBackend.Options(path=tmp_path, fsync=True))
    await backend.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=7))
    await backend.put(key, obj)
    assert_same_obj(await backend.get(key), obj)


async def test_a_removed_shard_directory_is_recreated(disk: DiskBackend) -> None:
    key = random_key()
    await disk.put(key, raw_obj(key, random_kv(seed=8)))
    os.unlink(chunk_path(disk.root, key))
    os.rmdir(os.path.dirname(chunk_path(disk.root, key)))
    await disk.put(key, raw_obj(key, random_kv(seed=8)))
    assert await disk.contains(key)


async def test_missing_path_is_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    await DiskBackend(DiskBackend.Options(path=root)).start()
    assert root.is_dir()


async def test_missing_path_without_create_names_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "missing"
    with pytest.raises(ConfigError, match=rf"{root} does not exist; create it \(mkdir -p"):
        await DiskBackend(DiskBackend.Options(path=root, create=False)).start()


async def test_path_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"cannot create {blocker}/sub"):
        await DiskBackend(DiskBackend.Options(path=blocker / "sub")).start()


async def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        await DiskBackend(DiskBackend.Options(path=blocker)).start()


async def test_unwritable_path_names_the_path_and_the_fix(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes through permission bits; /proc refuses new files to everyone
        root = Path("/proc/self")
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    with pytest.raises(ConfigError, match=rf"{root} is not writable .*chmod"):
        await DiskBackend(DiskBackend.Options(path=root)).start()


async def test_reads_share_no_memory_between_gets(disk: DiskBackend) -> None:
    key = random_key()
    kv = random_kv(seed=9)
    await disk.put(key, raw_obj(key, kv))
    a, b = await disk.get(key), await disk.get(key)
    a.data.zero_()
    assert torch.equal(b.data, kv)


@pytest.mark.parametrize("o_direct", [False, None])
@pytest.mark.parametrize("payload", [1, 4096 - 90, 4096, 3 * 4096 + 17, 1 << 20])
async def test_every_frame_length_round_trips(tmp_path: Path, o_direct: bool | None, payload: int) -> None:
    # Direct I/O writes whole blocks and the tail apart: try lengths around block edges.
    backend = DiskBackend(DiskBackend.Options(path=tmp_path, o_direct=o_direct))
    await backend.start()
    key = random_key()
    data = torch.randint(0, 256, (payload,), dtype=torch.uint8, generator=torch.Generator().manual_seed(payload))
    obj = MemoryObj(key, data, (2, 1, 1, 1), torch.float16, "opaque")
    await backend.put(key, obj)
    assert os.path.getsize(chunk_path(backend.root, key)) == frame.frame_size(obj)
    assert_same_obj(await backend.get(key), obj)
    await backend.close()


async def test_released_read_buffers_are_reused_and_unreleased_ones_are_not(disk: DiskBackend) -> None:
    a, b = random_key(), random_key()
    kv_a, kv_b = random_kv(seed=20), random_kv(seed=21)
    await disk.put(a, raw_obj(a, kv_a))
    await disk.put(b, raw_obj(b, kv_b))
    first = await disk.get(a)
    kept = first.data
    del first  # dropped without release: its buffer must not be handed out again
    second = await disk.get(b)
    assert kept.untyped_storage().data_ptr() != second.data.untyped_storage().data_ptr()
    assert torch.equal(kept, kv_a)
    ptr = second.data.untyped_storage().data_ptr()
    await disk.release(second)
    third = await disk.get(a)
    assert third.data.untyped_storage().data_ptr() == ptr, "a released buffer should serve the next read"
    assert torch.equal(third.data, kv_a)
    await disk.release(raw_obj(a, kv_a))  # not from this backend: ignored


async def test_idle_buffers_are_bounded_by_the_tier_capacity_and_let_go_on_close(tmp_path: Path) -> None:
    kv = random_kv(tokens=64, seed=22)  # 32 KiB chunks
    backend = DiskBackend(DiskBackend.Options(path=tmp_path / "chunks"))
    backend.capacity = 64 << 10  # a tier that holds two chunks keeps no more than that idle
    await backend.start()
    keys = [random_key() for _ in range(6)]
    for key in keys:
        await backend.put(key, raw_obj(key, kv))
    got = await backend.batch_get(keys)  # six buffers in use at once
    for obj in got:
        await backend.release(obj)
    assert 0 < backend.idle_buffer_bytes <= 64 << 10
    await backend.close()
    assert backend.idle_buffer_bytes == 0

    unbounded = DiskBackend(DiskBackend.Options(path=tmp_path / "chunks"))
    assert unbounded.buffer_pool_limit() == disk_module.DEFAULT_BUFFER_POOL
    set_by_user = DiskBackend(DiskBackend.Options(path=tmp_path / "chunks", buffer_pool=1 << 30))
    set_by_user.capacity = 64 << 10
    assert set_by_user.buffer_pool_limit() == 1 << 30, "an explicit buffer_pool wins over the capacity"


async def test_o_direct_choice(tmp_path: Path) -> None:
    auto = DiskBackend(DiskBackend.Options(path=tmp_path))
    await auto.start()
    assert auto.direct is disk_module.io.supports_direct(str(tmp_path))
    off = DiskBackend(DiskBackend.Options(path=tmp_path, o_direct=False))
    await off.start()
    assert off.direct is False


@pytest.mark.parametrize("view", ["contiguous", "chunk_of_longer_kv", "transposed", "payload"])
def test_encode_into_writes_the_frame_byte_for_byte(view: str) -> None:
    kv = random_kv(2, 64, 32, torch.bfloat16, seed=30)
    key = random_key()
    data = {"contiguous": kv, "chunk_of_longer_kv": kv[:, :, 5:17], "transposed": kv.transpose(2, 3)[:, :, :, 3:9],
            "payload": torch.arange(1001, dtype=torch.int64).to(torch.uint8)}[view]
    obj = MemoryObj(key, data, tuple(data.shape), torch.bfloat16, "none") if view != "payload" else \
        MemoryObj(key, data, (2, 1, 1, 1), torch.float16, "opaque")
    buffer = disk_module.io.AlignedBuffers(0).take(frame.frame_size(obj))
    n = disk_module.io.encode_into(obj, buffer)
    assert bytes(buffer[:n].numpy()) == frame.encode(obj)


@pytest.mark.parametrize("o_direct", [False, None])
async def test_a_kv_that_requires_grad_is_written(tmp_path: Path, o_direct: bool | None) -> None:
    backend = DiskBackend(DiskBackend.Options(path=tmp_path, o_direct=o_direct))
    await backend.start()
    key = random_key()
    kv = random_kv(seed=31, dtype=torch.float32).requires_grad_()
    await backend.put(key, raw_obj(key, kv))
    assert_same_obj(await backend.get(key), raw_obj(key, kv.detach()))
