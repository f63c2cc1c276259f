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
import time
from collections.abc import Callable

import torch

from runtime.serve.attention import MAX_DECODE_TOKENS
from runtime.serve.cache import PagedLatentCache, page_hashes, tokens_from_free_memory
from runtime.serve.graphs import DecodeGraphs
from runtime.serve.metrics import ServeMetrics
from runtime.serve.request import EngineError, Request, RequestOutput, above_share, fair_share
from runtime.serve.sampling import SamplingParams, emitted_logprobs, make_generator, sample_rows_or_errors
from runtime.serve.speculative import MTPSpeculator, pick_drafts, verify_segments
from runtime.serve.step import PipeStage, StepPlan, run_plan

__all__ = ["Engine", "EngineError", "RequestOutput", "SPECULATIVE", "SamplingParams"]

SPECULATIVE = ("off", "mtp")  # serve.speculative: off, or drafts from the model's MTP module


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
        speculative: str = "off",
        speculative_tokens: int = 1,
        cuda_graphs: bool = False,
    ) -> None:
        cfg = model.config
        for name, v in (("max_batch", max_batch), ("max_model_len", max_model_len),
                        ("max_prefill_tokens", max_prefill_tokens), ("page_size", page_size)):
            if v < 1:
                raise ValueError(f"serve.{name} must be >= 1, got {v}")
        _check_switches(speculative, speculative_tokens, cuda_graphs, pipe is not None or group is not None,
                        model.lm_head.weight.device)
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
            kv_cache_tokens = tokens_from_free_memory(n_layers * width * p.element_size(), p.device,
                                                       max_batch * max_model_len, group)
        num_pages = max(1, -(-kv_cache_tokens // page_size))
        slots = n_layers + (1 if speculative == "mtp" else 0)  # the MTP module's latents get a slot of their own
        self.cache = PagedLatentCache(slots, num_pages, page_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                      p.dtype, p.device)
        self.spec = MTPSpeculator(model, self.cache, n_layers, speculative_tokens) if speculative == "mtp" else None
        self.graphs = DecodeGraphs(model, self.cache, max_batch, max_model_len) if cuda_graphs else None
        if eos_ids is None:
            eos = cfg.eos_token_id
            eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_ids = set(eos_ids)
        self.vocab_size = cfg.vocab_size
        self.device = p.device
        self.plan_hook: Callable[[StepPlan], None] | None = None  # the driver broadcasts each plan first
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.metrics = ServeMetrics()
        self._busy_s = 0.0  # wall time inside step()
        self._seq = itertools.count()
        self._update_gauges()

    @classmethod
    def from_config(cls, model, serve: dict, pipe: PipeStage | None = None, group=None) -> Engine:
        """The engine of a job config's `[serve]` section."""
        return cls(model, max_batch=serve["max_batch"], max_model_len=serve["max_model_len"],
                   max_prefill_tokens=serve["max_prefill_tokens"], page_size=serve["page_size"],
                   kv_cache_tokens=serve["kv_cache_tokens"], pipe=pipe, group=group,
                   speculative=serve.get("speculative", "off"),
                   speculative_tokens=serve.get("speculative_tokens", 1), cuda_graphs=serve.get("cuda_graphs", False))

    def run_plan(self, plan: StepPlan) -> torch.Tensor:
        """This rank's part of a step's forward (the driver's `step` calls it; the other ranks run the plans
        they receive): logits of the wanted rows where this rank gets them. With decode graphs, a pure decode
        step replays its bucket's graph."""
        if self.graphs is not None:
            logits = self.graphs.run(plan)
            if logits is not None:
                return logits
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
        req.generator = None if params.greedy else make_generator(params.seed, self.device)
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
        t0 = time.perf_counter()
        sched = self._schedule()
        outputs = (self._step_speculative(sched) if self.spec is not None else self._step_plain(sched)
                   ) if sched else []
        self._busy_s += time.perf_counter() - t0
        self._update_gauges()
        return outputs

    def _step_plain(self, sched: list[tuple[Request, int]]) -> list[RequestOutput]:
        plan = StepPlan()
        for req, n in sched:
            want = req.num_computed + n == len(req.tokens)
            self._add_to_plan(plan, req, req.tokens[req.num_computed : req.num_computed + n], want)
        if self.plan_hook is not None:
            self.plan_hook(plan)
        logits = self.run_plan(plan)
        self.metrics.inc("steps_total")
        emitting = [req for (req, _), want in zip(sched, plan.want_logits) if want]
        tokens = sample_rows_or_errors(logits, [r.params for r in emitting], [r.generator for r in emitting])
        ok = [j for j, t in enumerate(tokens) if not isinstance(t, Exception)]
        lps = emitted_logprobs(logits, [emitting[j].params.logprobs for j in ok], [[tokens[j]] for j in ok], ok)
        for req, n in sched:
            req.num_computed += n
            self._offer_pages(req)
        now = time.perf_counter()
        return ([self._emit(emitting[j], [tokens[j]], lp, now) for j, lp in zip(ok, lps)]
                + [self._fail(emitting[j], t) for j, t in enumerate(tokens) if isinstance(t, Exception)])

    def _step_speculative(self, sched: list[tuple[Request, int]]) -> list[RequestOutput]:
        """A step with MTP drafts (runtime/serve/speculative.py): verify, emit 1..m+1 tokens per decoding
        request, then draft the next step's tokens."""
        plan, segs = StepPlan(), []  # segs: (req, tokens in the step, drafts verified or None for prefill)
        for req, n in sched:
            if len(req.tokens) - req.num_computed == 1:
                drafts = req.draft[: n - 1]
                self._add_to_plan(plan, req, [req.tokens[-1], *drafts], n)
                segs.append((req, n, drafts))
            else:
                want = req.num_computed + n == len(req.tokens)
                self._add_to_plan(plan, req, req.tokens[req.num_computed : req.num_computed + n], want)
                segs.append((req, n, None))
        index, ctx, hidden, logits = self.spec.verify(plan)
        self.metrics.inc("steps_total")
        emitted, rows, failed = verify_segments(
            logits, plan.want_logits, [(r.params, r.generator, d, r.draft_probs) for r, _, d in segs])
        # The MTP pass over every position of the step: the token after each one is known now.
        next_ids, draft_at, keep, budgets = [], [], [], []
        for k, (req, n, drafts) in enumerate(segs):
            start, toks = plan.starts[k], emitted[k]
            if k in failed:  # ends below; its MTP rows only ever feed drafts
                next_ids += [0] * n
            elif drafts is None:
                nxt = req.tokens[req.num_computed + 1 : req.num_computed + n + 1] + toks
                next_ids += nxt[:n]
            else:
                next_ids += toks + toks[-1:] * (n - len(toks))
            budget = self._drafts_wanted(req, toks) if toks else 0
            if budget:
                draft_at.append(start + (n if drafts is None else len(toks)) - 1)
                keep.append(k)
                budgets.append(budget)
        hm, dlogits = self.spec.draft(index, ctx, hidden, next_ids, draft_at) if keep else (None, None)
        for k, (req, n, drafts) in enumerate(segs):
            req.num_computed += n if drafts is None else len(emitted[k])
            self._offer_pages(req)
            req.draft, req.draft_probs = [], None
            if drafts is not None and k not in failed:
                self.metrics.inc("spec_verify_total")
                self.metrics.inc("spec_draft_tokens_total", len(drafts))
                self.metrics.inc("spec_accepted_tokens_total", len(emitted[k]) - 1)
        if keep:
            self._draft([segs[k][0] for k in keep], budgets, hm, dlogits)
        lps = emitted_logprobs(logits, [r.params.logprobs for r, _, _ in segs], emitted, rows)
        now = time.perf_counter()
        return ([self._emit(req, emitted[k], lps[k], now) for k, (req, _, _) in enumerate(segs) if emitted[k]]
                + [self._fail(segs[k][0], e) for k, e in failed.items()])

    def _drafts_wanted(self, req: Request, toks: list[int]) -> int:
        """How many drafts `req` can use in its next step after emitting `toks` (0 when it ends here)."""
        p = req.params
        if any(t in p.stop_ids or (not p.ignore_eos and t in self.eos_ids) for t in toks):
            return 0
        left = p.max_tokens - len(req.output) - len(toks)
        return max(0, min(self.spec.tokens, left - 1, self.max_model_len - len(req.tokens) - len(toks) - 1))

    def _draft(self, reqs: list[Request], budgets: list[int], hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Drafts from the MTP logits rows (one per request), chaining the module for more up to each budget."""
        active = list(range(len(reqs)))
        while True:
            picks = pick_drafts(logits, [reqs[j].params for j in active], [reqs[j].generator for j in active])
            for j, (t, q) in zip(active, picks):
                r = reqs[j]
                r.draft.append(t)
                if q is not None:
                    r.draft_probs = q[None] if r.draft_probs is None else torch.cat([r.draft_probs, q[None]])
            plan, rows, nxt = StepPlan(), [], []
            for row, j in enumerate(active):
                r = reqs[j]
                pos = r.num_computed + len(r.draft) - 1  # the position after the previous pass's
                if len(r.draft) < budgets[j] and self._reserve(r, pos + 1):
                    self._add_to_plan(plan, r, [r.draft[-1]], 1, offset=pos)
                    rows.append(row)
                    nxt.append(j)
            if not nxt:
                return
            hidden, logits = self.spec.chain(plan, hidden.index_select(0, torch.tensor(rows, device=hidden.device)))
            active = nxt

    def _add_to_plan(self, plan: StepPlan, req: Request, tokens: list[int], want: int, offset: int | None = None
                     ) -> None:
        """One segment for `req`: `tokens` from position `offset` (default: its first uncomputed one), with
        its block-table row."""
        if req.row is None:
            req.row, req.table_pages = self.cache.block_table.take_row(), 0
        plan.add(tokens, req.num_computed if offset is None else offset, req.pages, self.page_size, want,
                 row=req.row, table_from=req.table_pages)
        req.table_pages = len(req.pages)

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
            if pending == 1 and req.draft:  # verify the drafts too, if their pages can be had
                m = min(len(req.draft), req.params.max_tokens - len(req.output) - 1)
                if m > 0 and self._reserve(req, req.num_computed + 1 + m):
                    n += m
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
        share, held = fair_share(self.requests.values(), self.running, self.max_batch)
        i = 0
        while i < len(self.waiting) and budget > 0:
            req = self.waiting[i]
            if req.owner is not None and held.get(req.owner, 0) >= share:
                i += 1  # this owner has its share: the next owner's request may join
                continue
            if len(self.running) >= self.max_batch:
                victim = above_share(self.running, held, share)
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
        if req.row is not None:
            self.cache.block_table.give_row(req.row)
            req.row, req.table_pages = None, 0
        req.draft, req.draft_probs = [], None  # its MTP cache rows are gone with its pages

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        self.waiting.append(req)
        self.metrics.inc("preemptions_total")

    # --- outputs ----------------------------------------------------------------------------------------
    def _emit(self, req: Request, toks: list[int], lps: tuple[list, list] | None, now: float) -> RequestOutput:
        """Append the step's new tokens of `req` (one, or several from a speculative step, with their
        logprobs when asked); tokens after a stop or the length limit are dropped."""
        p = req.params
        out = RequestOutput(req.key, [], prompt_tokens=len(req.prompt))
        if p.logprobs:
            out.logprobs, out.top_logprobs = [], []
        reason = None
        for i, tok in enumerate(toks):
            req.output.append(tok)
            req.tokens.append(tok)
            out.ids.append(tok)
            if p.logprobs:
                req.logprobs.append(lps[0][i])
                req.top_logprobs.append(lps[1][i])
                out.logprobs.append(lps[0][i])
                out.top_logprobs.append(lps[1][i])
            if tok in p.stop_ids or (not p.ignore_eos and tok in self.eos_ids):
                reason = "stop"
            elif len(req.output) >= p.max_tokens or len(req.tokens) >= self.max_model_len:
                reason = "length"
            if reason is not None:
                break
        if not req.probe:
            if req.first_token_t is None:
                self.metrics.observe("time_to_first_token_seconds", now - req.arrival)
            else:
                self.metrics.observe("inter_token_latency_seconds", (now - req.last_token_t) / len(out.ids))
            self.metrics.inc("generation_tokens_total", len(out.ids))
        if req.first_token_t is None:
            req.first_token_t = now
        req.last_token_t = now
        if reason is not None:
            fin = self._finish(req, reason)
            out.finished, out.finish_reason = True, reason
            out.completion_tokens, out.cached_tokens = fin.completion_tokens, fin.cached_tokens
        return out

    def _fail(self, req: Request, exc: Exception) -> RequestOutput:
        """End `req` alone: its sampling raised `exc` (the step and every other request go on)."""
        out = self._finish(req, "error")
        out.error = f"sampling failed: {type(exc).__name__}: {exc}"
        self.metrics.inc("requests_failed_total")
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
        c = self.metrics.counters
        g["generation_tokens_per_s"] = c["generation_tokens_total"] / self._busy_s if self._busy_s else 0.0
        if self.spec is not None:
            drafted, verified = c["spec_draft_tokens_total"], c["spec_verify_total"]
            g["spec_acceptance_rate"] = c["spec_accepted_tokens_total"] / drafted if drafted else 0.0
            g["spec_tokens_per_step"] = (c["spec_accepted_tokens_total"] / verified + 1) if verified else 0.0


def _check_switches(speculative: str, tokens: int, cuda_graphs: bool, multi_rank: bool, device: torch.device
                    ) -> None:
    if speculative not in SPECULATIVE:
        raise ValueError(f"serve.speculative = {speculative!r} is not one of: {', '.join(map(repr, SPECULATIVE))}")
    if speculative != "off" and not 1 <= tokens < MAX_DECODE_TOKENS:
        raise ValueError(f"serve.speculative_tokens must be in 1..{MAX_DECODE_TOKENS - 1}, got {tokens}")
    for name, on in (("speculative", speculative != "off"), ("cuda_graphs", cuda_graphs)):
        if on and multi_rank:
            raise ValueError(f"serve.{name} runs on one rank only; this job serves on several (pipeline, "
                             f"tensor or expert parallel): leave serve.{name} off")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"serve.cuda_graphs needs a CUDA device; this model is on {device.type}")
