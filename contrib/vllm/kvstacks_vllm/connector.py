"""``KVStacksConnector``: vLLM's KV connector interface over a kvstacks engine.

    --kv-transfer-config '{"kv_connector": "KVStacksConnector",
        "kv_connector_module_path": "kvstacks_vllm.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"config": "stack.yaml"}}'

vLLM makes one instance per process and role. The *scheduler* half decides, per request,
how many leading tokens to load instead of compute; it asks the worker half over
``kvstacks_vllm.lookup`` because the engine, and with it the CPU tier, lives in the worker
process. The *worker* half owns the :class:`kvstacks.CacheEngine` (built from the stack
YAML; a ``controller:`` section makes it report to the controller like any worker), copies
loaded chunks into vLLM's paged KV before the forward pass and stores each prompt's KV
once its prefill is done. Loads are synchronous; a chunk that is gone or corrupt by then is
reported as a load error and vLLM recomputes from there, so a cache problem costs time,
never a wrong answer or a failed request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm import __version__ as vllm_version
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from kvstacks_vllm.lookup import LookupClient, LookupServer, socket_path
from kvstacks_vllm.paged import LayerKV, PagedKV
from kvstacks_vllm.probe import cpu_attn_isa, cpu_layout_matches
from kvstacks_vllm.stack import engine_for, stack_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = init_logger(__name__)


@dataclass
class Transfer:
    """Copy tokens ``[start, end)`` of ``tokens`` between the stack and the request's blocks."""

    req_id: str
    tokens: np.ndarray
    block_ids: list[int]
    start: int
    end: int


@dataclass
class KVStacksMetadata(KVConnectorMetadata):
    """What the worker does this step: loads before the forward pass, saves after it."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Request:
    """The scheduler half's view of one running request."""

    tokens: np.ndarray
    block_ids: list[int]
    held: int
    saved: bool = False


class KVStacksConnector(KVConnectorBase_V1):
    """A vLLM v1 KV connector whose store is a kvstacks tier stack."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        # A cache that cannot deliver is a miss: have vLLM recompute, never fail the request.
        ktc.kv_load_failure_policy = "recompute"
        self._config = stack_config(ktc.kv_connector_extra_config, vllm_config.model_config.model)
        self._block_size = vllm_config.cache_config.block_size
        world = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER:
            self._client = LookupClient([socket_path(ktc.engine_id, r) for r in range(world)])
            self._requests: dict[str, _Request] = {}
            self._held: dict[str, int] = {}
            self._to_load: dict[str, tuple[int, int]] = {}
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank() if world > 1 else 0
            model = vllm_config.model_config
            self._num_kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
            self._head_size = model.get_head_size()
            self._kv_cache_dtype = vllm_config.cache_config.cache_dtype
            self.engine = engine_for(self._config, rank=rank, world_size=world)
            self._paged: PagedKV | None = None
            self._staging: torch.Tensor | None = None
            self._failed_blocks: set[int] = set()
            self._server = LookupServer(socket_path(ktc.engine_id, rank), self._lookup)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        # The last token is always computed: its logits give the next token.
        n = request.num_tokens - 1
        if n <= num_computed_tokens:
            return 0, False
        tokens = np.asarray(request.all_token_ids[:n], dtype="<i4")
        held = self._client.lookup(tokens)
        self._held[request.request_id] = held
        log.debug("kvstacks: request %s: %d of %d tokens held", request.request_id, held, n)
        return max(0, held - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            end = self._held.get(request.request_id, 0)
            self._to_load[request.request_id] = (end - num_external_tokens, end)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStacksMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = np.asarray(new.prompt_token_ids or [], dtype="<i4")
            req = _Request(prompt, list(new.block_ids[0]), self._held.get(new.req_id, 0))
            self._requests[new.req_id] = req
            self._plan(meta, new.req_id, req, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            req = self._requests.get(req_id)
            if req is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Back from preemption: its blocks are all new, listed in full.
                req.block_ids = list(new_ids[0]) if new_ids is not None else []
                req.held = self._held.get(req_id, 0)
            elif new_ids is not None:
                req.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, req, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        # A request allocated but not scheduled (aborted meanwhile) loads nothing.
        self._to_load.clear()
        return meta

    def _plan(self, meta: KVStacksMetadata, req_id: str, req: _Request, computed: int) -> None:
        load = self._to_load.get(req_id)
        if load is not None:
            start, end = load
            meta.loads.append(Transfer(req_id, req.tokens[:end], req.block_ids, start, end))
        # Once the prompt's prefill is done, store all of it but the last token: the same
        # prompt again then loads everything it may, a longer one every whole chunk.
        stored = len(req.tokens) - 1
        if not req.saved and computed >= len(req.tokens):
            req.saved = True
            if req.held < stored:
                meta.saves.append(Transfer(req_id, req.tokens[:stored], list(req.block_ids), 0, stored))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._held.pop(request.request_id, None)
        self._to_load.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side

    def _lookup(self, tokens: np.ndarray) -> int:
        return self.engine.lookup(tokens) if self._paged is not None else 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_index(name: str) -> int:
            numbers = re.findall(r"\d+", name)
            return int(numbers[0]) if numbers else 0

        names = sorted(kv_caches, key=layer_index)
        first = kv_caches[names[0]]
        isa = "vec"
        if first.device.type == "cpu" and first.dim() == 4:
            # The layout inside a CPU block is the attention kernel's, chosen per ISA.
            isa = cpu_attn_isa(first.dtype, self._block_size, self._head_size, self._kv_cache_dtype)
            if not cpu_layout_matches(self._block_size, self._num_kv_heads, self._head_size, first.dtype, isa):
                # Loads would misplace tokens inside a block: better no cache than a wrong answer.
                log.error("kvstacks: vLLM's CPU attention kernel (%s) keeps a KV layout inside a block that "
                          "this kvstacks-vllm does not read right (vLLM %s); the connector loads and stores "
                          "nothing", isa, vllm_version)
                return
            log.info("kvstacks: reading vLLM's CPU KV blocks as its %s attention kernel lays them out", isa)
        layers = [LayerKV.from_cache(kv_caches[n], self._block_size, self._num_kv_heads, self._head_size, isa)
                  for n in names]
        self._paged = PagedKV(layers, self._block_size, self._num_kv_heads, self._head_size)

    def _buffer(self, tokens: int) -> torch.Tensor:
        # One staging buffer, grown to the longest prompt: touched memory copies faster than new.
        paged = self._paged
        assert paged is not None
        if self._staging is None or self._staging.shape[2] < tokens:
            self._staging = torch.empty((2, len(paged.layers), tokens, paged.hidden), dtype=paged.dtype)
        return self._staging

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStacksMetadata)
        if self._paged is None:
            return  # disabled: its lookups answered 0, so nothing was planned to load
        for load in meta.loads:
            loaded = load.start
            try:
                kv, held = self.engine.retrieve(load.tokens, out=self._buffer(load.end))
                loaded = max(load.start, min(held, load.end))
                if loaded > load.start:
                    self._paged.scatter(load.block_ids, load.start, kv[:, :, load.start:loaded])
            except Exception as exc:
                loaded = load.start
                log.warning("kvstacks: loading request %s failed, vLLM recomputes it: %s", load.req_id, exc)
            log.debug("kvstacks: request %s: loaded tokens %d-%d of %d-%d", load.req_id, load.start, loaded,
                      load.start, load.end)
            if loaded < load.end:
                first, last = loaded // self._block_size, -(-load.end // self._block_size)
                self._failed_blocks.update(load.block_ids[first:last])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv has loaded every layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole prompts are stored in wait_for_save, every layer in one pass

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStacksMetadata)
        if self._paged is None:
            return
        for save in meta.saves:
            try:
                kv = self._paged.gather(save.block_ids, save.start, save.end, self._buffer(save.end))
                self.engine.store(save.tokens, kv)
            except Exception as exc:
                log.warning("kvstacks: storing request %s failed (a future miss, nothing else): %s", save.req_id, exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.SCHEDULER:
            self._client.close()
            return
        self._server.close()
        self.engine.close()
