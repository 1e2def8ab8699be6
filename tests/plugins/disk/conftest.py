from __future__ import annotations

import pytest_asyncio
from kvstacks_disk import DiskBackend


@pytest_asyncio.fixture
async def disk(tmp_path):
    backend = DiskBackend(DiskBackend.Options(path=tmp_path / "chunks"))
    await backend.start()
    yield backend
    await backend.close()
