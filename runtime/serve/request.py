"""A serving request as the engine tracks it, what a step hands back for it, the error for a request the
engine cannot take, and the fair share of running slots between the owners (connections) of requests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from runtime.serve.sampling import SamplingParams

__all__ = ["EngineError", "Request", "RequestOutput", "above_share", "fair_share"]


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
    error: str | None = None  # the request failed (e.g. its sampling); it is finished, with this message


@dataclass(eq=False)  # compared by identity: `req in self.running` must not compare token lists
class Request:
    key: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    seq: int
    arrival: float
    owner: str | None = None  # fair-share group (None: takes part in no fair share)
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
    probe: bool = False  # a health check: served like any request, kept out of the traffic metrics

    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


def fair_share(requests: Iterable[Request], running: list[Request], max_batch: int
               ) -> tuple[int, dict[str | None, int]]:
    """(running slots per owner, running requests per owner) while two or more owners have requests;
    (max_batch, {}) otherwise (no owner is held back)."""
    owners = {r.owner for r in requests if r.owner is not None}
    if len(owners) < 2:
        return max_batch, {}
    held: dict[str | None, int] = {}
    for r in running:
        if r.owner is not None:
            held[r.owner] = held.get(r.owner, 0) + 1
    return -(-max_batch // len(owners)), held


def above_share(running: list[Request], held: dict[str | None, int], share: int) -> Request | None:
    """The least important running request of the owner furthest above its share, or None."""
    over = [r for r in running if r.owner is not None and held.get(r.owner, 0) > share]
    if not over:
        return None
    top = max(held[r.owner] for r in over)
    return max((r for r in over if held[r.owner] == top), key=Request.order)
