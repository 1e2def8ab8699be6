"""The conformance kit against both compressors of kvstacks-cachegen."""

from __future__ import annotations

import numpy as np
import pytest
from kvstacks.testing import CompressorConformance, random_kv
from kvstacks_cachegen.cli import fit_tables
from kvstacks_cachegen.compressor import CacheGenCompressor


class TestCacheGenDefault(CompressorConformance):
    # 32 bins over +-4 std: a step is 0.27 std, so the error is at most 0.13 std of a
    # channel; the kit's KV peaks at a few std of its widest channel
    tolerance = 0.08

    @pytest.fixture
    def compressor(self):
        return CacheGenCompressor()


class TestCacheGenLowInThread(CompressorConformance):
    tolerance = 0.15

    @pytest.fixture
    def compressor(self):
        return CacheGenCompressor(CacheGenCompressor.Options(level="low", workers=0, anchor_every=8))


class TestCacheGenFittedTables(CompressorConformance):
    """Tables fitted for the kit's 2-layer, 64-wide KV, so its bad-bytes tests hit the tables path."""

    tolerance = 0.08

    @pytest.fixture
    def compressor(self, tmp_path):
        fitter = CacheGenCompressor(CacheGenCompressor.Options(workers=0))
        samples = [random_kv(2, 256, 64, seed=s).float().numpy() for s in range(3)]
        tables = fit_tables(fitter, samples, 256, 4, "kit")
        path = tmp_path / "tables.json"
        tables.save(path)
        return CacheGenCompressor(CacheGenCompressor.Options(tables=path))


def test_fitted_kit_payload_uses_tables(tmp_path):
    fitter = CacheGenCompressor(CacheGenCompressor.Options(workers=0))
    tables = fit_tables(fitter, [random_kv(2, 256, 64, seed=1).float().numpy()], 256, 4, "kit")
    path = tmp_path / "t.json"
    tables.save(path)
    payload = CacheGenCompressor(CacheGenCompressor.Options(tables=path, workers=0)).compress(random_kv(2, 32, 64))
    assert payload[7] & 1, "a chunk of the fitted shape is coded with the tables"
    assert bytes(payload[20:28]) == tables.table_id
    assert np.asarray(tables.row_class).size == 2 * 2 * 64
