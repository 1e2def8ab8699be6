"""Prefix caching for a transformers causal LM through a kvstacks engine.

Before a prefill, the longest prefix of the prompt the engine holds is loaded into a
``DynamicCache`` and only the rest of the prompt runs through the model; afterwards
the KV the stack did not have is stored. The last prompt token is always computed,
because its logits give the first new token; so at most ``len(prompt) - 1`` tokens
are ever looked up, and that is also what is stored: an identical prompt next time
then needs a one-token prefill.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kvstacks.errors import InvalidInput

from kvstacks_transformers.layout import KVLayout


def cache_argument(model: Any) -> str:
    """The keyword this model's ``forward`` (and so ``generate``) takes its KV cache by.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and deprecated the old name,
    while vLLM's CPU build pins an older 5.x where only ``past_key_values`` exists. Both
    swallow unknown keywords, so passing the wrong one silently drops the cache and the model
    computes the rest of the prompt with no context: ask the signature instead of the version.
    """
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass
class PrefillResult:
    """What :meth:`PrefixCachedLM.prefill` did, and its outputs."""

    #: ``[1, k, vocab]``: the last prompt token's logits (k = 1), or every computed token's
    logits: torch.Tensor
    #: the model's cache for the whole prompt, ready for decoding
    past_key_values: Any
    prompt_tokens: int
    #: tokens whose KV came from the stack
    cached_tokens: int
    #: tokens run through the model
    computed_tokens: int
    #: tokens offered to the stack afterwards (0 when it already had them all)
    stored_tokens: int
    retrieve_s: float
    compute_s: float
    store_s: float

    @property
    def ttft_s(self) -> float:
        """Time until the first new token's logits existed: load the prefix, compute the rest.

        Storing happens after the logits are ready and is not part of it (see ``store_s``).
        """
        return self.retrieve_s + self.compute_s

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.logits[:, -1]


@dataclass
class CacheUse:
    """How much of the last :meth:`PrefixCachedLM.generate` prompt came from the stack."""

    prompt_tokens: int
    cached_tokens: int
    stored_tokens: int


def as_prompt(input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """One prompt as a 1-D int64 CPU tensor; accepts a list, a 1-D tensor or a ``[1, T]`` batch."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(list(input_ids))
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise InvalidInput(
                f"prefix caching works on one sequence at a time, got a batch of {ids.shape[0]}; "
                "call it once per prompt"
            )
        ids = ids[0]
    if ids.dim() != 1:
        raise InvalidInput(f"input_ids must be [tokens] or [1, tokens], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InvalidInput("the prompt is empty: give at least one token")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InvalidInput(f"input_ids must be token ids (integers), got {ids.dtype}")
    return ids.to(device="cpu", dtype=torch.long)


class PrefixCachedLM:
    """A causal LM whose prompts reuse the KV a kvstacks engine holds for their prefixes.

    ``model`` is a loaded ``AutoModelForCausalLM`` (one whose every layer is full
    attention), ``engine`` a :class:`kvstacks.CacheEngine` whose stack is for this model
    alone (its ``model:`` name keys the chunks). ``kv_dtype`` is the dtype stored (the
    model's by default, which keeps cached and uncached outputs identical; float16 halves
    the bytes of a float32 model at a small numerical cost).

    Not thread-safe: it reuses one staging buffer, the size of the longest prompt's KV,
    for every load. Use one per thread.
    """

    def __init__(self, model: Any, engine: Any, *, kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.engine = engine
        self.layout = KVLayout.from_model(model)
        self.kv_dtype = kv_dtype or self.layout.dtype
        self.last_use: CacheUse | None = None
        self._staging: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_prefix(self, prompt: torch.Tensor) -> tuple[Any, int]:
        """A ``DynamicCache`` with the longest stored prefix of ``prompt[:-1]``, and its length."""
        from transformers import DynamicCache

        if prompt.numel() < 2:
            return DynamicCache(), 0
        kv, cached = self._retrieve(prompt[:-1])
        if kv is None or cached == 0:
            return DynamicCache(), 0
        return self.layout.kv_to_cache(kv[:, :, :cached], device=self.device), cached

    def _retrieve(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        # The engine copies the prefix into ``out``; memory already touched copies ~3x faster
        # than a fresh allocation, so one buffer, grown to the longest prompt, is reused.
        need = tokens.numel()
        if self._staging is None or self._staging.shape[2] < need:
            self._staging = torch.empty((2, self.layout.num_layers, need, self.layout.hidden), dtype=self.kv_dtype)
        try:
            return self.engine.retrieve(tokens, out=self._staging)
        except InvalidInput:
            # The stack holds another dtype or layout than this buffer; check_kv names the problem.
            return self.engine.retrieve(tokens)

    def store(self, tokens: torch.Tensor, cache: Any) -> int:
        """Store the KV of ``tokens`` (the first ``len(tokens)`` positions of ``cache``)."""
        kv = self.layout.cache_to_kv(cache, end=tokens.numel(), dtype=self.kv_dtype)
        self.engine.store(tokens, kv)
        return tokens.numel()

    def prefill(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        *,
        store: bool = True,
        all_logits: bool = False,
    ) -> PrefillResult:
        """Run the prompt through the model, reusing and then extending the stack's prefix KV.

        Returns the last token's logits (every computed token's with ``all_logits``) and a
        cache ready for decoding. ``store=False`` reads from the stack but adds nothing.
        """
        prompt = as_prompt(input_ids)
        total = prompt.numel()
        start = time.perf_counter()
        cache, cached = self.load_prefix(prompt)
        loaded = time.perf_counter()
        rest = prompt[cached:].unsqueeze(0).to(self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=rest, use_cache=True, logits_to_keep=0 if all_logits else 1,
                **{cache_argument(self.model): cache},
            )
        computed = time.perf_counter()
        stored = 0
        if store and cached < total - 1:
            stored = self.store(prompt[: total - 1], out.past_key_values) - cached
        done = time.perf_counter()
        return PrefillResult(
            logits=out.logits, past_key_values=out.past_key_values, prompt_tokens=total,
            cached_tokens=cached, computed_tokens=total - cached, stored_tokens=stored,
            retrieve_s=loaded - start, compute_s=computed - loaded, store_s=done - computed,
        )

    def generate(self, input_ids: Sequence[int] | torch.Tensor, *, store: bool = True, **kwargs: Any) -> Any:
        """``model.generate(input_ids, **kwargs)`` with the prompt's cached prefix loaded first.

        Afterwards the KV of the prompt and the generated text (all but the last token, whose
        KV was never computed) is stored, so the next turn of a conversation that repeats
        this one finds it. Returns what ``model.generate`` returns. One sequence, no beams.
        """
        for name in ("past_key_values", "cache"):
            if name in kwargs:
                raise InvalidInput(f"PrefixCachedLM.generate builds the cache ({name}) itself; do not pass one")
        for name in ("num_beams", "num_return_sequences"):
            if (kwargs.get(name) or 1) != 1:
                raise InvalidInput(f"{name}={kwargs[name]} is not supported: prefix caching is one sequence")
        prompt = as_prompt(input_ids)
        cache, cached = self.load_prefix(prompt)
        batch = prompt.unsqueeze(0).to(self.device)
        kwargs.setdefault("attention_mask", torch.ones_like(batch))
        with torch.inference_mode():
            out = self.model.generate(batch, **{cache_argument(self.model): cache}, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        # The last generated token was sampled but never fed back, so the cache is one short.
        length = min(cache.get_seq_length(), sequences.shape[1] - 1)
        stored = 0
        if store and length > cached:
            tokens = sequences[0, :length].cpu()
            kv = self.layout.cache_to_kv(cache, end=length, dtype=self.kv_dtype)
            self.engine.store(tokens, kv)
            # Also the prompt but its last token, as prefill stores it: its last partial chunk is
            # what the same prompt asked again looks up. Whole chunks are already there.
            if prompt.numel() - 1 > cached:
                self.engine.store(tokens[: prompt.numel() - 1], kv[:, :, : prompt.numel() - 1])
            stored = length - cached
        self.last_use = CacheUse(prompt.numel(), cached, stored)
        return out
