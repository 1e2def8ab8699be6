import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from kvstacks.errors import InvalidInput
from kvstacks.keys import CacheKey, as_token_array, chunk_bounds, chunk_hashes


def test_same_tokens_same_hashes_and_prefix_property():
    tokens = list(range(1000))
    a = chunk_hashes(tokens, 256)
    assert len(a) == 4  # three full chunks and the partial one
    b = chunk_hashes(tokens[:512], 256)
    assert a[:2] == b
    assert chunk_hashes(torch.tensor(tokens), 256) == a
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 256) == a


def test_partial_chunk_is_optional():
    assert len(chunk_hashes(list(range(300)), 256, partial=False)) == 1
    assert chunk_bounds(300, 256) == [(0, 256), (256, 300)]


def test_salt_separates_tenants():
    tokens = list(range(512))
    assert chunk_hashes(tokens, salt=b"a") != chunk_hashes(tokens, salt=b"b")
    assert set(chunk_hashes(tokens, salt=b"a")).isdisjoint(chunk_hashes(tokens))


def test_a_changed_token_changes_every_later_hash():
    tokens = list(range(768))
    changed = tokens.copy()
    changed[10] = 99999
    a, b = chunk_hashes(tokens), chunk_hashes(changed)
    assert all(x != y for x, y in zip(a, b))


def test_hashes_are_portable_across_processes_with_different_hash_seeds():
    code = "from kvstacks.keys import chunk_hashes; print(''.join(h.hex() for h in chunk_hashes(list(range(700)), 256, b't')))"
    outputs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outputs) == 1
    assert outputs.pop().strip() == "".join(h.hex() for h in chunk_hashes(list(range(700)), 256, b"t"))


def test_known_value_pins_the_hash_function():
    # If this changes, every stored cache in the world is orphaned: change it only with a format version bump.
    assert chunk_hashes([1, 2, 3], 256)[0].hex() == chunk_hashes(np.array([1, 2, 3], dtype="<i4"), 256)[0].hex()
    import xxhash
    expected = xxhash.xxh3_128(b"\x00" * 16 + np.array([1, 2, 3], dtype="<i4").tobytes()).digest()
    assert chunk_hashes([1, 2, 3], 256)[0] == expected


@pytest.mark.parametrize("bad, message", [
    ([1, -2], "non-negative"),
    ([1.5, 2.0], "integers"),
    ([[1, 2]], "flat"),
    ([2**40], "int32"),
    (torch.tensor([1.0]), "integers"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"),
])
def test_bad_tokens_are_refused_with_a_reason(bad, message):
    with pytest.raises(InvalidInput, match=message):
        as_token_array(bad)


def test_key_string_round_trip():
    key = CacheKey("llama@3", "kv", 2, 1, bytes(range(16)))
    assert CacheKey.from_string(key.to_string()) == key
    with pytest.raises(InvalidInput):
        CacheKey.from_string("nonsense")
