"""Step-level serving engine: `add_request`, `abort`, `step() -> outputs`, with continuous batching.

Every `step()` schedules one batched forward: each running request contributes either one decode token or
a prefill chunk (prefill tokens per step are capped by `max_prefill_tokens`), and waiting requests join as
soon as there is room (`max_batch` running, pages in the cache). Requests are ordered by priority (higher
first) then arrival. Requests may name an `owner` (the server's connection): while several owners have
requests, each gets a fair share of the running slots (max_batch / owners, rounded up) before priority
decides, and an owner above its share yields a running slot (preempted by recompute) to one below it.
When a decode needs a page and none is free, the least important running request is preempted by
recompute: its pages go back (full ones stay in the prefix cache, so the recompute is mostly a prefix hit)
and it waits again with its generated tokens, to be re-prefilled later. The engine is driven
from outside (the server loop, or later the shared train/serve scheduler), so it never blocks.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.serve.cache import PagedLatentCache, page_hashes
from runtime.serve.metrics import ServeMetrics
from runtime.serve.step import PipeStage, SamplingParams, StepPlan, logprobs_of, make_generator, run_plan, sample

__all__ = ["Engine", "EngineError", "RequestOutput", "SamplingParams"]


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


@dataclass
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
    generator: torch.Generator | None = None
    first_token_t: float | None = None
    last_token_t: float | None = None
    probe: bool = False  # a health check: served like any request, kept out of the traffic metrics

    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class Engine:
    """The serving engine of one rank. `pipe` (a step.PipeStage): this rank runs only that pipeline stage
    and its page pool holds only its layers. `group`: the job's control group, over which the ranks agree
    on the page count when it is sized from free memory (the driver's plans name pages)."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 64,
        max_model_len: int = 4096,
        max_prefill_tokens: int = 2048,
        page_size: int = 64,
        kv_cache_tokens: int = 0,
        eos_ids: list[int] | None = None,
        pipe: PipeStage | None = None,
        group=None,
    ) -> None:
        cfg = model.config
        for name, v in (("max_batch", max_batch), ("max_model_len", max_model_len),
                        ("max_prefill_tokens", max_prefill_tokens), ("page_size", page_size)):
            if v < 1:
                raise ValueError(f"serve.{name} must be >= 1, got {v}")
        self.model = model
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_prefill_tokens, self.page_size = max_prefill_tokens, page_size
        self.pipe = pipe
        # the model as one pipeline stage (the view the step's forward runs), when it is not pipelined
        self.stage = model.pipeline_stage(0, 1, range(len(model.model.layers))) if pipe is None else None
        p = model.lm_head.weight
        n_layers = len(model.model.layers) if pipe is None else len(pipe.layer_ids)
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if kv_cache_tokens <= 0:
            kv_cache_tokens = _tokens_from_free_memory(n_layers * width * p.element_size(), p.device,
                                                       max_batch * max_model_len, group)
        num_pages = max(1, -(-kv_cache_tokens // page_size))
        self.cache = PagedLatentCache(n_layers, num_pages, page_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                      p.dtype, p.device)
        if eos_ids is None:
            eos = cfg.eos_token_id
            eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_ids = set(eos_ids)
        self.vocab_size = cfg.vocab_size
        self.plan_hook: Callable[[StepPlan], None] | None = None  # the driver broadcasts each plan first
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.metrics = ServeMetrics()
        self._seq = itertools.count()
        self._update_gauges()

    @classmethod
    def from_config(cls, model, serve: dict, pipe: PipeStage | None = None, group=None) -> Engine:
        """The engine of a job config's `[serve]` section."""
        return cls(model, max_batch=serve["max_batch"], max_model_len=serve["max_model_len"],
                   max_prefill_tokens=serve["max_prefill_tokens"], page_size=serve["page_size"],
                   kv_cache_tokens=serve["kv_cache_tokens"], pipe=pipe, group=group)

    def run_plan(self, plan: StepPlan) -> torch.Tensor:
        """This rank's part of a step's forward (the driver's `step` calls it; the other ranks run the plans
        they receive): logits of the wanted rows where this rank gets them."""
        return run_plan(self.model, self.cache, plan, self.pipe, self.stage)

    # --- public API -----------------------------------------------------------------------------------
    def add_request(
        self, key: str, prompt_ids: list[int], params: SamplingParams | None = None, priority: int = 0,
        owner: str | None = None, probe: bool = False,
    ) -> None:
        """Queue a request. `probe` (a health check) runs like any other but is counted apart: not in
        requests, tokens, prefix-cache or latency metrics."""
        params = params or SamplingParams()
        if key in self.requests:
            raise EngineError("bad_request", f"request id {key!r} is already active")
        try:
            params.validate()
        except ValueError as e:
            raise EngineError("bad_request", str(e)) from None
        if not prompt_ids:
            raise EngineError("bad_request", "the prompt is empty")
        bad = [t for t in prompt_ids if not (0 <= t < self.vocab_size)]
        if bad:
            raise EngineError("bad_request", f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise EngineError("too_long", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                          f"= {total} exceeds serve.max_model_len {self.max_model_len}")
        if -(-total // self.page_size) > self.cache.num_pages:
            raise EngineError("too_long", f"{total} tokens need more pages than the whole KV cache "
                                          f"({self.cache.num_pages} x {self.page_size})")
        req = Request(key, list(prompt_ids), params, int(priority), next(self._seq), time.perf_counter(), owner,
                      probe=probe)
        req.tokens = list(prompt_ids)
        req.generator = None if params.temperature == 0.0 else make_generator(params.seed)
        self.requests[key] = req
        self.waiting.append(req)
        if not probe:
            self.metrics.inc("requests_total")
        self._update_gauges()

    def abort(self, key: str) -> RequestOutput | None:
        """End a request now (finish_reason "abort"), returning its pages; None if it is not active."""
        req = self.requests.get(key)
        if req is None:
            return None
        if not req.probe:
            self.metrics.inc("requests_aborted_total")
        out = self._finish(req, "abort")
        self._update_gauges()
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_active(self) -> int:
        return len(self.requests)

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batched forward; returns what each touched request produced."""
        outputs: list[RequestOutput] = []
        sched = self._schedule()
        if sched:
            plan = StepPlan()
            for req, n in sched:
                want = req.num_computed + n == len(req.tokens)
                plan.add(req.tokens[req.num_computed : req.num_computed + n], req.num_computed, req.pages,
                         self.page_size, want)
            if self.plan_hook is not None:
                self.plan_hook(plan)
            logits = self.run_plan(plan).cpu()
            self.metrics.inc("steps_total")
            now = time.perf_counter()
            row = 0
            for (req, n), want in zip(sched, plan.want_logits):
                req.num_computed += n
                self._offer_pages(req)
                if want:
                    outputs.append(self._emit_or_fail(req, logits[row], now))
                    row += 1
        self._update_gauges()
        return outputs

    # --- scheduling -----------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.max_prefill_tokens
        sched: list[tuple[Request, int]] = []
        for req in sorted(self.running, key=Request.order):
            if req not in self.running:  # preempted below for a more important one
                continue
            pending = len(req.tokens) - req.num_computed
            n = 1 if pending == 1 else min(pending, budget)
            if n == 0:
                continue
            while not self._reserve(req, req.num_computed + n):
                victim = max(self.running, key=Request.order)
                self._preempt(victim)
                if victim is req:
                    break
            else:
                sched.append((req, n))
                if pending > 1:
                    budget -= n
        self.waiting.sort(key=Request.order)
        share, held = self._fair_share()
        i = 0
        while i < len(self.waiting) and budget > 0:
            req = self.waiting[i]
            if req.owner is not None and held.get(req.owner, 0) >= share:
                i += 1  # this owner has its share: the next owner's request may join
                continue
            if len(self.running) >= self.max_batch:
                victim = self._above_share(held, share)
                if victim is None:
                    break
                sched = [(r, k) for r, k in sched if r is not victim]
                self._preempt(victim)
                held[victim.owner] -= 1
            if not req.pages:
                self._match_prefix(req)
            n = min(len(req.tokens) - req.num_computed, budget)
            ok = self._reserve(req, req.num_computed + n)
            if not ok and self.running:
                victim = max(self.running, key=Request.order)
                if victim.order() > req.order():  # a more important request displaces a less important one
                    sched = [(r, k) for r, k in sched if r is not victim]
                    self._preempt(victim)
                    ok = self._reserve(req, req.num_computed + n)
            if not ok:
                self._release(req)  # hold nothing while waiting, or a waiter could starve the running
                break
            self._count_admission(req)
            self.waiting.pop(i)
            self.running.append(req)
            if req.owner is not None:
                held[req.owner] = held.get(req.owner, 0) + 1
            sched.append((req, n))
            budget -= n if n > 1 or req.num_computed == 0 else 0
        return sched

    def _fair_share(self) -> tuple[int, dict[str | None, int]]:
        """(running slots per owner, running requests per owner) while two or more owners have requests;
        (max_batch, {}) otherwise (no owner is held back)."""
        owners = {r.owner for r in self.requests.values() if r.owner is not None}
        if len(owners) < 2:
            return self.max_batch, {}
        held: dict[str | None, int] = {}
        for r in self.running:
            if r.owner is not None:
                held[r.owner] = held.get(r.owner, 0) + 1
        return -(-self.max_batch // len(owners)), held

    def _above_share(self, held: dict[str | None, int], share: int) -> Request | None:
        """The least important running request of the owner furthest above its share, or None."""
        over = [r for r in self.running if r.owner is not None and held.get(r.owner, 0) > share]
        if not over:
            return None
        top = max(held[r.owner] for r in over)
        return max((r for r in over if held[r.owner] == top), key=Request.order)

    def _match_prefix(self, req: Request) -> None:
        usable = (len(req.tokens) - 1) // self.page_size  # always compute at least the last token
        pages = self.cache.prefix.match(page_hashes(req.tokens, self.page_size, usable))
        req.pages, req.num_computed, req.hashed_pages = pages, len(pages) * self.page_size, len(pages)

    def _count_admission(self, req: Request) -> None:
        if req.probe:
            req.admitted = True
        elif not req.admitted:
            req.admitted = True
            req.cached_tokens = req.num_computed
            self.metrics.inc("prefix_cache_queries_tokens_total", len(req.prompt))
            self.metrics.inc("prefix_cache_hits_tokens_total", req.num_computed)
        else:  # re-admission after preemption: what is not found again is recomputed
            self.metrics.inc("recomputed_tokens_total", len(req.tokens) - 1 - req.num_computed)

    def _reserve(self, req: Request, n_tokens: int) -> bool:
        need = -(-n_tokens // self.page_size) - len(req.pages)
        if need <= 0:
            return True
        pages = self.cache.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _offer_pages(self, req: Request) -> None:
        full = req.num_computed // self.page_size
        if full > req.hashed_pages:
            hashes = page_hashes(req.tokens, self.page_size, full)
            self.cache.prefix.insert(hashes[req.hashed_pages :], req.pages[req.hashed_pages : full])
            req.hashed_pages = full

    def _release(self, req: Request) -> None:
        self._offer_pages(req)
        self.cache.allocator.decref(req.pages)
        req.pages, req.num_computed, req.hashed_pages = [], 0, 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        self.waiting.append(req)
        self.metrics.inc("preemptions_total")

    # --- outputs ----------------------------------------------------------------------------------------
    def _emit_or_fail(self, req: Request, logits: torch.Tensor, now: float) -> RequestOutput:
        """`_emit`, or, when this request's sampling fails, the end of this request alone (its error set)."""
        try:
            return self._emit(req, logits, now)
        except Exception as e:  # noqa: BLE001 - whatever one request's parameters provoke stays with it
            if req.key not in self.requests:
                raise
            out = self._finish(req, "error")
            out.error = f"sampling failed: {type(e).__name__}: {e}"
            self.metrics.inc("requests_failed_total")
            return out

    def _emit(self, req: Request, logits: torch.Tensor, now: float) -> RequestOutput:
        p = req.params
        tok = sample(logits, p, req.generator)
        req.output.append(tok)
        req.tokens.append(tok)
        out = RequestOutput(req.key, [tok], prompt_tokens=len(req.prompt))
        if p.logprobs:
            lp, top = logprobs_of(logits, tok, p.logprobs)
            req.logprobs.append(lp)
            req.top_logprobs.append(top)
            out.logprobs, out.top_logprobs = [lp], [top]
        if not req.probe:
            if req.first_token_t is None:
                self.metrics.observe("time_to_first_token_seconds", now - req.arrival)
            else:
                self.metrics.observe("inter_token_latency_seconds", now - req.last_token_t)
            self.metrics.inc("generation_tokens_total")
        if req.first_token_t is None:
            req.first_token_t = now
        req.last_token_t = now
        reason = None
        if tok in p.stop_ids or (not p.ignore_eos and tok in self.eos_ids):
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.tokens) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            fin = self._finish(req, reason)
            out.finished, out.finish_reason = True, reason
            out.completion_tokens, out.cached_tokens = fin.completion_tokens, fin.cached_tokens
        return out

    def _finish(self, req: Request, reason: str) -> RequestOutput:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        del self.requests[req.key]
        if not req.probe:
            self.metrics.observe("e2e_latency_seconds", time.perf_counter() - req.arrival)
            if reason not in ("abort", "error"):
                self.metrics.inc("requests_finished_total")
            self.metrics.inc("prompt_tokens_total", len(req.prompt))
        return RequestOutput(
            req.key, [], finished=True, finish_reason=reason, prompt_tokens=len(req.prompt),
            completion_tokens=len(req.output), cached_tokens=req.cached_tokens,
        )

    def check_invariants(self) -> None:
        """Every page's reference count equals its holders (requests + prefix cache); for tests."""
        refs = [0] * self.cache.num_pages
        for req in self.requests.values():
            for p in req.pages:
                refs[p] += 1
        for p in self.cache.prefix.pages.values():
            refs[p] += 1
        if refs != self.cache.allocator.refs:
            raise AssertionError("page reference counts do not match their holders")
        self.cache.allocator.check()

    def _update_gauges(self) -> None:
        g = self.metrics.gauges
        g["requests_running"], g["requests_waiting"] = len(self.running), len(self.waiting)
        used = self.cache.pages_used()
        g["kv_pages_total"], g["kv_pages_used"] = self.cache.num_pages, used
        g["kv_pages_cached"] = len(self.cache.prefix)
        g["kv_cache_usage"] = used / self.cache.num_pages


def _tokens_from_free_memory(bytes_per_token: int, device: torch.device, cap: int, group=None) -> int:
    """KV capacity when serve.kv_cache_tokens = 0: half the free accelerator memory, or on CPU a tenth of
    the available RAM, never more than max_batch * max_model_len tokens; the minimum over `group`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 10
        except (ValueError, OSError, AttributeError):
            budget = 1 << 30
    n = max(1, min(cap, budget // max(1, bytes_per_token)))
    if group is not None:
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device="cpu")  # over the control group
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        n = int(t[0])
    return n
