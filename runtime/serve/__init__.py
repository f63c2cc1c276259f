"""Serving: the ZeroMQ server and protocol, the step-level engine with continuous batching over a paged latent
KV cache, one step's plan, forward and sampling, metrics; `app.serve` puts them together (see
docs/serving.md)."""

from runtime.serve.cache import PageAllocator, PagedLatentCache, PrefixCache
from runtime.serve.engine import Engine, EngineError, RequestOutput
from runtime.serve.step import SamplingParams

__all__ = [
    "Engine", "EngineError", "PageAllocator", "PagedLatentCache", "PrefixCache", "RequestOutput",
    "SamplingParams",
]
