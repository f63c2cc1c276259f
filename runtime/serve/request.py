"""A serving request as the engine tracks it, what a step hands back for it, and the error for a request
the engine cannot take."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.serve.sampling import SamplingParams

__all__ = ["EngineError", "Request", "RequestOutput"]


class EngineError(ValueError):
    """A request the engine cannot take; `code` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens (maybe none) and, at the end, the reason."""

    key: str
    ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)  # compared by identity: `req in self.running` must not compare token lists
class Request:
    key: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    seq: int
    arrival: float
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    hashed_pages: int = 0  # leading full pages already offered to the prefix cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False
    row: int | None = None  # this request's row in the cache's block table while it holds pages
    table_pages: int = 0  # how many of its pages that row holds
    draft: list[int] = field(default_factory=list)  # speculative: tokens proposed after the last one
    draft_probs: torch.Tensor | None = None  # [len(draft), V]: their draft distributions (sampled requests)
    generator: torch.Generator | None = None
    first_token_t: float | None = None
    last_token_t: float | None = None

    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)
