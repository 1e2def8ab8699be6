import pytest_asyncio
import torch
from kvstacks import CacheEngine
from kvstacks.testing import BackendConformance
from kvstacks_sqlite.backend import SqliteBackend


class TestSqliteBackend(BackendConformance):
    @pytest_asyncio.fixture
    async def backend(self, tmp_path):
        backend = SqliteBackend(SqliteBackend.Options(path=tmp_path / "kv.sqlite"))
        await backend.start()
        return backend

    def corrupt(self, backend, key):
        data = bytearray(backend._db.execute("SELECT frame FROM chunks WHERE key = ?", (key.to_string(),)).fetchone()[0])
        data[len(data) // 2] ^= 0xFF
        backend._db.execute("UPDATE chunks SET frame = ? WHERE key = ?", (bytes(data), key.to_string()))


def test_in_a_stack_from_yaml(tmp_path):
    stack = tmp_path / "stack.yaml"
    stack.write_text(f"model: m\nstack:\n  - backend: sqlite\n    path: {tmp_path / 'kv.sqlite'}\n")
    kv = torch.randn(2, 2, 300, 8).half()
    with CacheEngine.from_yaml(stack) as engine:
        engine.store(list(range(300)), kv)
    with CacheEngine.from_yaml(stack) as engine:  # a restart finds what was stored
        out, n = engine.retrieve(list(range(300)))
    assert n == 300 and torch.equal(out, kv)
