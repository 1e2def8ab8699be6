"""``kvstacks bench``: per-tier store/retrieve throughput beside a memcpy baseline."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from kvstacks.config import load_yaml


def _memcpy_gbps(nbytes: int, rounds: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times) / 1e9


def run_bench(config_path: str, layers: int, hidden: int, dtype: str, chunks: int, repeats: int,
              progress: bool = True) -> dict[str, Any]:
    from kvstacks.engine import CacheEngine

    cfg = load_yaml(config_path)
    tokens_per_chunk = cfg.chunk_size
    kv = torch.randn(2, layers, tokens_per_chunk * chunks, hidden).to(getattr(torch, dtype))
    chunk_bytes = kv.numel() * kv.element_size() // chunks
    result: dict[str, Any] = {
        "chunk_tokens": tokens_per_chunk, "chunk_bytes": chunk_bytes, "chunks": chunks, "repeats": repeats,
        "memcpy_gbps": _memcpy_gbps(chunk_bytes, max(5, chunks)), "tiers": {},
    }
    bar = tqdm(total=len(cfg.stack) * repeats, desc="bench", unit="round", disable=not progress)
    for tier_cfg in cfg.stack:
        # Each tier alone, with a salt of its own so the bench never touches real cached data.
        single = dataclasses.replace(cfg, stack=[tier_cfg], controller=None, salt=f"kvstacks-bench-{os.getpid()}")
        store_times, retrieve_times = [], []
        with CacheEngine(single) as engine:
            for r in range(repeats):
                prompts = [[r * chunks + i] * tokens_per_chunk for i in range(chunks)]
                parts = [kv[:, :, i * tokens_per_chunk:(i + 1) * tokens_per_chunk] for i in range(chunks)]
                started = time.perf_counter()
                for prompt, part in zip(prompts, parts):
                    engine.store(prompt, part)
                store_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                for prompt in prompts:
                    engine.retrieve(prompt)
                retrieve_times.append(time.perf_counter() - started)
                for prompt in prompts:
                    engine.remove(prompt)
                bar.update()
        total = chunk_bytes * chunks
        store_s, retrieve_s = statistics.median(store_times), statistics.median(retrieve_times)
        result["tiers"][tier_cfg.name] = {
            "store_gbps": total / store_s / 1e9, "retrieve_gbps": total / retrieve_s / 1e9,
            "store_ms": store_s / chunks * 1e3, "retrieve_ms": retrieve_s / chunks * 1e3,
            "retrieve_vs_memcpy": total / retrieve_s / 1e9 / result["memcpy_gbps"],
        }
    bar.close()
    return result
