"""File names of the disk tier: the whole key, recoverable without opening the file."""

from __future__ import annotations

import os

import pytest
from kvstacks.keys import CacheKey
from kvstacks_disk import layout

MODELS = ["llama-3.1-8b", "meta-llama/Llama-3.1-8B", ".", "..", "", "a b%c~d", "модель", "x" * 150]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kv_format", ["kv", "fp8.e4m3", "", "a/b"])
def test_key_round_trips_through_the_path(model: str, kv_format: str) -> None:
    key = CacheKey(model, kv_format, 8, 3, bytes(range(16)))
    path = layout.chunk_path("/root", key)
    model_dir, shard, name = path.split(os.sep)[-3:]
    assert os.path.dirname(os.path.dirname(os.path.dirname(path))) == "/root"
    assert model_dir not in (".", "..", "") and "/" not in model_dir
    assert shard == "00"
    assert layout.key_from_name(layout.unescape(model_dir), name) == key


@pytest.mark.parametrize("name", [
    "notes.txt", ".hidden.kvc", "00.1.0.kv.kvc.tmp", "zz.1.0.kv.kvc", "00.1.kv.kvc",
    "00.1_0.0.kv.kvc", "00. 1.0.kv.kvc", "00.1.0.kv.extra.kvc", "00.1.0.%ZZ.kvc",
])
def test_foreign_names_are_not_keys(name: str) -> None:
    assert layout.key_from_name("m", name) is None


def test_temp_names() -> None:
    assert layout.is_temp(".00.1.0.kv.kvc.123.abcd.tmp")
    assert not layout.is_temp("00.1.0.kv.kvc")
