"""Serving: paged latent KV cache, step-level engine with continuous batching, sampling, metrics."""

from runtime.serve.cache import PageAllocator, PagedLatentCache, PrefixCache
from runtime.serve.engine import Engine, EngineError, RequestOutput
from runtime.serve.sampling import SamplingParams

__all__ = [
    "Engine", "EngineError", "PageAllocator", "PagedLatentCache", "PrefixCache", "RequestOutput",
    "SamplingParams",
]
