"""cachegen: error bounds, exact parts, hostile bytes, tables, config."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvstacks.config import parse_stack
from kvstacks.errors import ConfigError, CorruptChunk
from kvstacks.plugins import registry
from kvstacks.testing import random_kv
from kvstacks_cachegen.cli import cachegen as cachegen_cli
from kvstacks_cachegen.compressor import LEVELS, CacheGenCompressor, layer_bins
from kvstacks_cachegen.tables import load_tables


def make(**options) -> CacheGenCompressor:
    options.setdefault("workers", 0)
    return CacheGenCompressor(CacheGenCompressor.Options(**options))


def round_trip(c, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    payload = bytes(c.compress(kv))
    return c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype), len(payload)


def step_bound(kv: torch.Tensor, bins: list[int], clip: float) -> torch.Tensor:
    """Half a quantization step per (K/V, layer, channel), from the fp16 std the coder uses."""
    x = kv.float().numpy()
    std16 = x.std(axis=2).astype(np.float16).astype(np.float32)
    half_width = (np.asarray(layer_bins(bins, kv.shape[1])) // 2 - 1).reshape(1, -1, 1)
    return torch.from_numpy(std16 * np.float32(clip) / half_width / 2)[:, :, None, :]


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_within_half_a_step_per_level(level, dtype):
    kv = random_kv(6, 96, 64, dtype, seed=3)
    c = make(level=level, sinks="never")
    decoded, _ = round_trip(c, kv)
    bound = step_bound(kv, LEVELS[level], 4.0)
    # plus the rounding of the output dtype (bf16 keeps 8 mantissa bits)
    ulp = kv.float().abs() * {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-22}[dtype]
    err = (decoded.float() - kv.float()).abs()
    assert (err <= bound * 1.001 + ulp + 1e-7).all(), float((err - bound - ulp).max())


def test_levels_trade_size_for_error():
    kv = random_kv(6, 256, 128, seed=4)
    results = {}
    for level in ("high", "default", "low"):
        decoded, size = round_trip(make(level=level), kv)
        results[level] = (size, float((decoded.float() - kv.float()).pow(2).mean()))
    assert results["high"][0] > results["default"][0] > results["low"][0]
    assert results["high"][1] < results["default"][1] < results["low"][1]
    assert kv.numel() * 2 / results["default"][0] > 3.0, "default level compresses fp16 KV well over 3x"


def test_bins_option_overrides_level():
    kv = random_kv(3, 64, 32, seed=5)
    _, size_16 = round_trip(make(bins=[16]), kv)
    _, size_64 = round_trip(make(bins=[64]), kv)
    assert size_16 < size_64


def test_outliers_escape_exactly():
    kv = random_kv(2, 64, 32, torch.float16, seed=6)
    kv[0, 1, 10, 5] = 900.0
    kv[1, 0, 40, 7] = -750.0
    decoded, _ = round_trip(make(sinks="never"), kv)
    assert decoded[0, 1, 10, 5].item() == 900.0
    assert decoded[1, 0, 40, 7].item() == -750.0


def test_sink_tokens_always_exact():
    kv = random_kv(2, 64, 32, torch.bfloat16, seed=7)
    decoded, _ = round_trip(make(sinks="always", sink_tokens=4), kv)
    assert torch.equal(decoded[:, :, :4], kv[:, :, :4])
    assert not torch.equal(decoded[:, :, 4:], kv[:, :, 4:])


def test_sink_detected_at_sequence_start_only():
    kv = random_kv(3, 64, 32, torch.float16, seed=8)
    start = kv.clone()
    start[1, :, 0] *= 0.1  # a sink token's V is far smaller than its neighbours'
    c = make(sink_tokens=8)
    decoded, _ = round_trip(c, start)
    assert torch.equal(decoded[:, :, :8], start[:, :, :8])
    decoded, _ = round_trip(c, kv)
    assert not torch.equal(decoded[:, :, :8], kv[:, :, :8])


def test_delta_coding_round_trip_and_bound():
    kv = random_kv(3, 100, 32, torch.float16, seed=9)
    decoded, _ = round_trip(make(anchor_every=10, sinks="never"), kv)
    err = (decoded.float() - kv.float()).abs()
    peak = kv.float().abs().amax(dim=2, keepdim=True)
    assert (err <= peak * 0.1 + 1e-3).all()


@pytest.mark.parametrize("tokens", [1, 2, 3, 17])
def test_tiny_and_partial_chunks(tokens):
    kv = random_kv(2, tokens, 16, seed=tokens)
    for c in (make(), make(anchor_every=4), make(sinks="always", sink_tokens=16)):
        decoded, _ = round_trip(c, kv)
        assert decoded.shape == kv.shape and torch.isfinite(decoded).all()


def test_non_finite_chunk_is_stored_exactly():
    kv = random_kv(2, 16, 16, torch.float16, seed=10)
    kv[0, 0, 0, 0] = float("nan")
    kv[1, 1, 3, 3] = float("inf")
    decoded, _ = round_trip(make(), kv)
    assert torch.equal(decoded.view(torch.int16), kv.view(torch.int16))


def test_worker_processes_give_the_same_payload():
    kv = random_kv(8, 256, 128, seed=11)
    serial = bytes(make(workers=0).compress(kv))
    parallel = CacheGenCompressor(CacheGenCompressor.Options(workers=1))
    assert bytes(parallel.compress(kv)) == serial
    decoded = parallel.decompress(memoryview(serial), tuple(kv.shape), kv.dtype)
    assert torch.equal(decoded, make(workers=0).decompress(memoryview(serial), tuple(kv.shape), kv.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("options", [{"anchor_every": 7}, {"sinks": "always"}, {"bins": [256, 100]}, {"tables": True}])
def test_workers_decode_every_kind_of_chunk_like_this_thread(tmp_path, sample_npz, options, dtype):
    if options.get("tables"):
        run_fit("--kv", sample_npz, "--out", tmp_path / "t.json")
        options = {"tables": tmp_path / "t.json"}
    kv = random_kv(3, 1024, 32, dtype, seed=14)
    serial = make(**options)
    payload = bytes(serial.compress(kv))
    parallel = CacheGenCompressor(CacheGenCompressor.Options(workers=2, **options))
    assert bytes(parallel.compress(kv)) == payload
    assert parallel.pool.all, "the chunk is big enough to be split across workers"
    expected = serial.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    assert torch.equal(parallel.decompress(memoryview(payload), tuple(kv.shape), kv.dtype), expected)
    assert (expected.float() - kv.float()).abs().max() < kv.float().abs().max()


def test_worker_that_died_is_replaced_by_this_thread():
    c = CacheGenCompressor(CacheGenCompressor.Options(workers=1))
    kv = random_kv(8, 256, 128, seed=12)
    expected = bytes(make(workers=0).compress(kv))
    c.pool._start()
    for worker in list(c.pool.all):
        worker.proc.kill()
        worker.proc.wait()
    assert bytes(c.compress(kv)) == expected


@pytest.mark.parametrize("tabled", [False, True])
def test_words_that_outgrow_the_workers_room_are_coded_here(monkeypatch, tmp_path, sample_npz, tabled):
    from kvstacks_cachegen import coder_pool

    options = {}
    if tabled:
        run_fit("--kv", sample_npz, "--out", tmp_path / "t.json")
        options = {"tables": tmp_path / "t.json"}
    real = coder_pool._layout

    def cramped(op, streams):
        places, end = real(op, streams)
        return [(i, o, 4) for i, o, _ in places], end

    monkeypatch.setattr(coder_pool, "_layout", cramped)
    kv = random_kv(3, 2048, 32, seed=15)
    c = CacheGenCompressor(CacheGenCompressor.Options(workers=1, **options))
    assert bytes(c.compress(kv)) == bytes(make(**options).compress(kv))
    assert c.pool.all


def test_a_chunk_a_worker_finds_uncodable_is_stored_exactly():
    kv = random_kv(8, 256, 128, seed=17)
    kv[:, :, 100, 3] = float("nan")  # in every slab, so the worker's share meets one too
    c = CacheGenCompressor(CacheGenCompressor.Options(workers=1))
    payload = bytes(c.compress(kv))
    assert payload == bytes(make().compress(kv))
    decoded = c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    assert torch.equal(decoded.view(torch.int16), kv.view(torch.int16))
    fine = random_kv(8, 256, 128, seed=18)  # and the worker is still in step for the next chunk
    assert bytes(c.compress(fine)) == bytes(make().compress(fine))


def test_worker_that_dies_while_decoding_makes_a_miss_and_is_replaced(monkeypatch):
    from kvstacks_cachegen import coder_pool

    kv = random_kv(8, 256, 128, seed=16)
    c = CacheGenCompressor(CacheGenCompressor.Options(workers=1))
    payload = bytes(c.compress(kv))
    (old,) = c.pool.all

    def dies(self, op, streams):
        self.proc.kill()
        self.proc.wait()
        raise coder_pool.WorkerFailed("coder worker closed its pipe")

    with monkeypatch.context() as m:
        m.setattr(coder_pool.CoderWorker, "receive", dies)
        with pytest.raises(CorruptChunk, match="died"):
            c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    (new,) = c.pool.all
    assert new is not old and new.proc.poll() is None
    decoded = c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    assert torch.equal(decoded, make(workers=0).decompress(memoryview(payload), tuple(kv.shape), kv.dtype))


def test_corrupt_streams_split_across_workers_are_a_miss_and_leave_them_in_step():
    kv = random_kv(8, 256, 128, seed=19)
    c = CacheGenCompressor(CacheGenCompressor.Options(workers=1))
    payload = bytes(c.compress(kv))
    bad = bytearray(payload)
    bad[len(bad) // 2:] = bytes([0xA5]) * (len(bad) - len(bad) // 2)  # the second half is all stream words
    with pytest.raises(CorruptChunk):
        c.decompress(memoryview(bytes(bad)), tuple(kv.shape), kv.dtype)
    expected = make().decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    assert torch.equal(c.decompress(memoryview(payload), tuple(kv.shape), kv.dtype), expected)


# ---- hostile bytes ----

def valid_payload(**options) -> tuple[bytes, tuple[int, ...], torch.dtype, CacheGenCompressor]:
    c = make(**options)
    kv = random_kv(2, 24, 16, torch.float16, seed=13)
    return bytes(c.compress(kv)), tuple(kv.shape), kv.dtype, c


def decodes_or_refuses(c, payload: bytes, shape, dtype) -> None:
    try:
        out = c.decompress(memoryview(payload), shape, dtype)
    except CorruptChunk:
        return
    assert tuple(out.shape) == shape and out.dtype == dtype


PAYLOAD, SHAPE, DTYPE, CODER = valid_payload()
DELTA_PAYLOAD, _, _, DELTA_CODER = valid_payload(anchor_every=5, sinks="always", sink_tokens=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash(junk):
    decodes_or_refuses(CODER, junk, SHAPE, DTYPE)
    decodes_or_refuses(CODER, b"KVCG\x01" + junk, SHAPE, DTYPE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_payloads_never_crash(data):
    payload, coder = data.draw(st.sampled_from([(PAYLOAD, CODER), (DELTA_PAYLOAD, DELTA_CODER)]))
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 8))]
    decodes_or_refuses(coder, bytes(buf), SHAPE, DTYPE)


def test_truncation_and_header_lies_are_corrupt_chunk():
    for cut in (0, 3, 10, 40, len(PAYLOAD) // 2, len(PAYLOAD) - 1):
        with pytest.raises(CorruptChunk):
            CODER.decompress(memoryview(PAYLOAD[:cut]), SHAPE, DTYPE)
    with pytest.raises(CorruptChunk, match="not"):
        CODER.decompress(memoryview(PAYLOAD), (2, 2, 25, 16), DTYPE)
    with pytest.raises(CorruptChunk):
        CODER.decompress(memoryview(PAYLOAD), SHAPE, torch.bfloat16)
    # a header that asks for an enormous chunk is refused before anything is allocated
    with pytest.raises(CorruptChunk):
        CODER.decompress(memoryview(PAYLOAD), (2, 4096, 1 << 20, 4096), DTYPE)
    huge = bytearray(PAYLOAD)
    huge[8:20] = struct.pack("<III", 4096, 1 << 20, 4096)
    with pytest.raises(CorruptChunk, match="exceeds"):
        CODER.decompress(memoryview(bytes(huge)), (2, 4096, 1 << 20, 4096), DTYPE)
    # stream words claimed beyond the payload
    lie = bytearray(PAYLOAD)
    lie[-5] ^= 0x40
    with pytest.raises(CorruptChunk):
        CODER.decompress(memoryview(bytes(lie)), SHAPE, DTYPE)


# ---- tables ----

@pytest.fixture
def sample_npz(tmp_path):
    path = tmp_path / "kv.npz"
    np.savez(path, a=random_kv(3, 300, 32, seed=20).float().numpy(), b=random_kv(3, 200, 32, seed=21).float().numpy())
    return path


def run_fit(*args) -> str:
    result = CliRunner().invoke(cachegen_cli, ["fit", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_fit_then_compress_with_tables(tmp_path, sample_npz):
    out = tmp_path / "tables.json"
    text = run_fit("--kv", sample_npz, "--out", out, "--classes", "4", "--name", "kit")
    assert "table id" in text
    tables = load_tables(out)
    assert tables.layers == 3 and tables.hidden == 32 and tables.bins == layer_bins(LEVELS["default"], 3)
    with_tables = make(tables=out)
    kv = random_kv(3, 256, 32, seed=22)
    payload = bytes(with_tables.compress(kv))
    decoded = with_tables.decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    plain_decoded, plain_size = round_trip(make(), kv)
    assert torch.equal(decoded, plain_decoded), "tables change the coding, never the values"
    assert len(payload) < plain_size, "fitted tables drop the per-chunk tables"
    with pytest.raises(CorruptChunk, match="tables"):
        make().decompress(memoryview(payload), tuple(kv.shape), kv.dtype)
    # tables fitted for another shape: coded with per-chunk tables, still decodable without them
    other = random_kv(2, 64, 16, seed=23)
    assert torch.equal(make().decompress(memoryview(bytes(with_tables.compress(other))), tuple(other.shape),
                                         other.dtype), round_trip(make(), other)[0])


def test_fit_with_other_bins_and_a_mismatch_is_a_config_error(tmp_path, sample_npz):
    out = tmp_path / "t16.json"
    run_fit("--kv", sample_npz, "--out", out, "--bins", "16,16")
    assert load_tables(out).bins == [16, 16, 16]
    with pytest.raises(ConfigError, match="fitted for bins"):
        make(tables=out, bins=[32])
    with pytest.raises(ConfigError, match="fitted for bins"):
        make(tables=out, clip=3.0)
    assert make(tables=out, bins=[16]).tables is not None


def test_fit_refuses_pickles_and_bad_shapes(tmp_path):
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = CliRunner().invoke(cachegen_cli, ["fit", "--kv", str(pickled), "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "pickle" in result.output
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((4, 4), dtype=np.float32))
    result = CliRunner().invoke(cachegen_cli, ["fit", "--kv", str(flat), "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "[2, layers, tokens, hidden]" in result.output
    result = CliRunner().invoke(cachegen_cli, ["fit", "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "--kv" in result.output


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(format="other"), "not a cachegen table file"),
    (lambda d: d.update(row_class=d["row_class"][:-1]), "row_class"),
    (lambda d: d["row_class"].__setitem__(0, 999), "does not exist"),
    (lambda d: d.update(bins=[15] * d["layers"]), "even"),
    (lambda d: d["classes"].__setitem__(0, [1, 2, 3]), "bins differ"),
    (lambda d: d.pop("clip"), "clip"),
])
def test_bad_table_files_are_config_errors(tmp_path, sample_npz, edit, message):
    out = tmp_path / "t.json"
    run_fit("--kv", sample_npz, "--out", out, "--classes", "2")
    data = json.loads(out.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        make(tables=out)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        make(tables=tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="cannot read"):
        make(tables=tmp_path / "missing.json")


# ---- configuration ----

@pytest.mark.parametrize("options, field", [
    ({"bins": [15]}, "bins"), ({"bins": []}, "bins"), ({"bins": [512]}, "bins"),
    ({"clip": 0.0}, "clip"), ({"clip": math.inf}, "clip"), ({"anchor_every": 1}, "anchor_every"),
    ({"sink_tokens": -1}, "sink_tokens"), ({"workers": -2}, "workers"),
])
def test_bad_options_name_the_option(options, field):
    with pytest.raises(ConfigError) as info:
        CacheGenCompressor(CacheGenCompressor.Options(**options))
    assert info.value.path.endswith(field)


def test_registered_with_declared_losslessness():
    reg = registry()
    assert reg.get("compressors", "cachegen") is CacheGenCompressor and not CacheGenCompressor.lossless
    assert reg.get("compressors", "zstd").lossless  # the lossless option lives in core


def test_lossless_tier_refuses_cachegen_at_config_time():
    backends = registry().names("backends")
    if not backends:
        pytest.skip("no backend plugin installed to build a tier with")
    backend = "cpu" if "cpu" in backends else backends[0]
    tier = {"backend": backend, "lossless": True}
    if backend == "disk":
        tier["path"] = "/tmp/kvstacks-unused"
    with pytest.raises(ConfigError, match="lossy") as info:
        parse_stack({"stack": [dict(tier, compressor="cachegen")]})
    assert info.value.path == "stack[0].compressor"
    cfg = parse_stack({"stack": [dict(tier, compressor="zstd")]})
    assert cfg.stack[0].compressor == "zstd"
    cfg = parse_stack({"stack": [{"backend": backend, "compressor": "cachegen",
                                  "compressor_options": {"level": "low", "bins": [32, 16, 16]}}]})
    assert cfg.stack[0].compressor_options.bins == [32, 16, 16]
    with pytest.raises(ConfigError, match="compressor_options.level"):
        parse_stack({"stack": [{"backend": backend, "compressor": "cachegen", "compressor_options": {"level": "max"}}]})


def test_fit_is_a_subcommand_of_kvstacks(tmp_path, sample_npz):
    from kvstacks.cli import cli
    from kvstacks.plugins import load_plugins

    if "cachegen" not in cli.commands:
        load_plugins().hook.register_cli_commands(cli=cli)
    out = tmp_path / "root.json"
    result = CliRunner().invoke(cli, ["cachegen", "fit", "--kv", str(sample_npz), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_tables(out).layers == 3


@pytest.mark.parametrize("top", [11, 3982, 255, 2])
def test_the_most_frequent_symbol_keeps_the_top_count(top):
    """hist * (255 / top) rounded 11 * (255 / 11) to just above 255, which wrapped to 0 in
    the uint8 cast: the most frequent symbol of such a stream got the smallest probability."""
    from kvstacks_cachegen.streams import class_counts

    symbols = np.concatenate([np.full(top - 1, 3), np.arange(8)]).astype(np.uint8)  # symbol 3: top times
    counts = class_counts(symbols, 8)
    assert counts[3] == 255 and counts.argmax() == 3
