"""kvstacks-transformers: prefix caching for Hugging Face causal LMs through a kvstacks engine.

    from kvstacks import CacheEngine
    from kvstacks_transformers import PrefixCachedLM

    lm = PrefixCachedLM(model, CacheEngine.from_yaml("stack.yaml"))
    out = lm.generate(input_ids, max_new_tokens=64)      # like model.generate
    result = lm.prefill(input_ids)                       # or just the prefill

Importing this package does not import transformers; the entry point (the ``kvstacks
demo`` command) stays cheap to load.
"""

from kvstacks_transformers.layout import KVLayout, UnsupportedModel
from kvstacks_transformers.prefix_cache import CacheUse, PrefillResult, PrefixCachedLM, cache_argument

__all__ = ["CacheUse", "KVLayout", "PrefillResult", "PrefixCachedLM", "UnsupportedModel", "cache_argument"]
