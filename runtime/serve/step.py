"""One serving step: its plan and its forward over the paged latent cache.

The step is described by a `StepPlan` of plain integers (token ids, positions, cache slots, per-sequence
segments, page lists and block-table rows), so the driver rank can broadcast it (one wire encoding: a flat
int64 tensor over the control group) and every rank runs the same forward on its own copy of the page pool.
The forward is the model's own decoder layers (`DecoderLayer.forward`, through the model's one-stage
`PipelineStage` view, or this rank's stages of the job's pipeline schedule made forward-only) with the
`PagedAttention` context of `runtime/serve/attention.py`: token-wise work (embedding, projections, norms, MoE
with its all-to-all) runs once over all the step's tokens; attention splits by segment (decode rows over the
paged cache in the absorbed form, prefill chunks batched over sequences in the expanded form), from index
tensors built once per step (once per micro-batch under a pipeline).

Sampling lives in `runtime/serve/sampling.py` (re-exported here): on the logits' device, batched over rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.serve.attention import PagedAttention, StepIndex
from runtime.serve.sampling import MAX_LOGPROBS, SamplingParams, logprobs_of, make_generator, sample

__all__ = ["MAX_LOGPROBS", "MAX_PLAN_INTS", "PagedAttention", "PipeStage", "SamplingParams", "StepIndex",
           "StepPlan", "decoder_forward", "logprobs_of", "make_generator", "run_plan", "sample"]

MAX_PLAN_INTS = 8 << 20  # one broadcast plan: a few integers per scheduled token and page


# --- the plan --------------------------------------------------------------------------------------------------
_TOKEN_FIELDS = ("ids", "positions", "slots")
_SEGMENT_FIELDS = ("starts", "lens", "offsets", "rows", "table_from")


@dataclass
class StepPlan:
    """Segments in order; segment i covers tokens [starts[i], starts[i] + lens[i]) of the flat token list.

    `offsets[i]` is the number of tokens of that sequence already cached (its first position), `pages[i]`
    the sequence's page ids, `want_logits[i]` how many of its last tokens need logits (0 or 1 = True for a
    chunk that ends the known tokens, so a new token is sampled; all of them for tokens a speculative step
    verifies). `rows[i]` is the sequence's row in the cache's persistent block table and `table_from[i]`
    the first of its pages that row does not hold yet (0: write them all, e.g. the row changed hands): a
    step writes only those. Without a row from the caller a segment gets row i, written whole.
    """

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    table_from: list[int] = field(default_factory=list)
    pages: list[list[int]] = field(default_factory=list)
    want_logits: list[int] = field(default_factory=list)

    def add(self, tokens: list[int], offset: int, pages: list[int], page_size: int, want: bool | int,
            row: int | None = None, table_from: int = 0) -> None:
        self.starts.append(len(self.ids))
        self.lens.append(len(tokens))
        self.offsets.append(offset)
        self.rows.append(len(self.rows) if row is None else row)
        self.table_from.append(0 if row is None else table_from)
        self.pages.append(list(pages))
        self.want_logits.append(int(want))
        self.ids.extend(tokens)
        end = offset + len(tokens)
        self.positions.extend(range(offset, end))
        self.slots.extend(pages[p // page_size] * page_size + p % page_size for p in range(offset, end))

    def __len__(self) -> int:
        return len(self.starts)

    def select(self, segments: list[int]) -> StepPlan:
        """The plan of these segments (in this order)."""
        out = StepPlan()
        for i in segments:
            s, n = self.starts[i], self.lens[i]
            out.starts.append(len(out.ids))
            for name in ("lens", "offsets", "rows", "table_from", "pages", "want_logits"):
                getattr(out, name).append(getattr(self, name)[i])
            for name in _TOKEN_FIELDS:
                getattr(out, name).extend(getattr(self, name)[s : s + n])
        return out

    def split(self, parts: int) -> list[StepPlan]:
        """Exactly `parts` plans of consecutive segments with about equal token counts (the step's
        micro-batches); the last ones are empty when there are fewer segments than parts."""
        return [self.select(g) for g in self.split_segments(list(range(len(self))), parts)]

    def split_segments(self, segments: list[int], parts: int) -> list[list[int]]:
        """`segments` cut into exactly `parts` consecutive runs of about equal token counts (empty runs last)."""
        groups: list[list[int]] = [[]]
        total, acc = sum(self.lens[i] for i in segments), 0
        for k, i in enumerate(segments):
            groups[-1].append(i)
            acc += self.lens[i]
            if len(groups) < parts and acc * parts >= total * len(groups) and k < len(segments) - 1:
                groups.append([])
        return groups + [[] for _ in range(parts - len(groups))]

    # the one wire encoding: [n_tokens, n_segments, token fields, segment fields, want, page counts, pages]
    def encode(self) -> list[int]:
        out = [len(self.ids), len(self.starts)]
        for name in _TOKEN_FIELDS + _SEGMENT_FIELDS:
            out.extend(getattr(self, name))
        out.extend(int(w) for w in self.want_logits)
        out.extend(len(p) for p in self.pages)
        for p in self.pages:
            out.extend(p)
        return out

    @classmethod
    def decode(cls, flat: list[int]) -> StepPlan:
        n_tok, n_seg = flat[0], flat[1]
        pos, vals = 2, {}
        for name in _TOKEN_FIELDS + _SEGMENT_FIELDS:
            n = n_tok if name in _TOKEN_FIELDS else n_seg
            vals[name] = flat[pos : pos + n]
            pos += n
        want = flat[pos : pos + n_seg]
        counts = flat[pos + n_seg : pos + 2 * n_seg]
        pos += 2 * n_seg
        pages = []
        for c in counts:
            pages.append(flat[pos : pos + c])
            pos += c
        return cls(pages=pages, want_logits=want, **vals)

    def broadcast(self, bcast: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Driver side: send this plan (length, then the flat ints) through `bcast` (a broadcast from the
        driver). A plan over `MAX_PLAN_INTS` is refused before anything is sent, so the ranks stay in step."""
        flat = self.encode()
        if len(flat) > MAX_PLAN_INTS:
            raise ValueError(f"step plan of {len(flat)} integers exceeds MAX_PLAN_INTS = {MAX_PLAN_INTS}; "
                             "nothing was sent (lower serve.max_batch or serve.max_prefill_tokens)")
        bcast(torch.tensor([len(flat)], dtype=torch.int64, device="cpu"))  # the control plane: host tensors
        bcast(torch.tensor(flat, dtype=torch.int64, device="cpu"))

    @staticmethod
    def broadcast_none(bcast: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Driver side: this serving step ran nothing (the followers' `receive` returns None)."""
        bcast(torch.zeros(1, dtype=torch.int64, device="cpu"))

    @classmethod
    def receive(cls, bcast: Callable[[torch.Tensor], torch.Tensor]) -> StepPlan | None:
        """Follower side of `broadcast` / `broadcast_none`; a length outside the bound is refused before
        anything is allocated for it (a corrupt or mismatched sender)."""
        n = int(bcast(torch.zeros(1, dtype=torch.int64, device="cpu"))[0])
        if n == 0:
            return None
        if not 2 <= n <= MAX_PLAN_INTS:
            raise ValueError(f"broadcast step plan length {n} is outside [2, {MAX_PLAN_INTS}] (MAX_PLAN_INTS): "
                             "a corrupt or mismatched sender")
        return cls.decode(bcast(torch.zeros(n, dtype=torch.int64, device="cpu")).tolist())


# --- the forward ------------------------------------------------------------------------------------------------
class PipeStage:
    """This rank's part of a pipelined serving forward, driven by the job's pipeline schedule made
    forward-only (schedules are data for serving too): `executor` (a parallel.pipeline PipelineExecutor over
    this rank's stages, one or two of them) runs each step cut into `executor.schedule.chunks` micro-batches,
    its p2p lowered and posted through cluster.p2p like training's. `layer_ids` are the decoder layers of
    this rank's stages (its page pool holds those, in that order). The last stage's logits rows go to the
    engine's rank (pp group rank 0 of the engine's pipeline, `engine_pipe`) over the pp group."""

    def __init__(self, executor, group, engine_pipe: bool) -> None:
        self.executor, self.group, self.engine_pipe = executor, group, engine_pipe
        self.layer_ids = sorted(i for s in executor.stages.values() for i in s.layer_ids)
        self.micro = executor.schedule.chunks
        self.pp_rank = executor.pp_rank


@torch.no_grad()
def run_plan(model, cache, plan: StepPlan, pipe: PipeStage | None = None, stage=None) -> torch.Tensor:
    """Run the step; returns fp32 logits [n_wanted, V], one row per segment with want_logits, in order.

    Without `pipe` the model runs whole (`stage`: its one-stage view, `model.pipeline_stage(0, 1, ...)`, made
    here when not given). With `pipe`, only this rank's stages run, micro-batch by micro-batch as the
    schedule says; the engine's rank gets every micro-batch's logits (other ranks return an empty tensor)."""
    dev = model.lm_head.weight.device
    if pipe is None:
        stage = stage or model.pipeline_stage(0, 1, range(len(model.model.layers)))
        return _stage_forward(stage, cache, StepIndex(plan, cache, dev), {li: li for li in stage.layer_ids}, None)
    slots = {li: i for i, li in enumerate(pipe.layer_ids)}
    groups = _microbatches(plan, pipe.executor.schedule.directions)
    subs = [plan.select(g) for g in groups]
    indexes: dict[int, StepIndex] = {}  # one per micro-batch, shared by this rank's stages (two under DualPipeV)

    def forward(stage, mb: int, x: torch.Tensor | None) -> torch.Tensor:
        if mb not in indexes:
            indexes[mb] = StepIndex(subs[mb], cache, dev)
        return _stage_forward(stage, cache, indexes[mb], slots, x)

    hidden = model.config.hidden_size
    outputs = pipe.executor.run_forward_with(forward, lambda mb: (1, len(subs[mb].ids), hidden),
                                             model.lm_head.weight.dtype, dev)
    logits = _deliver_logits(pipe, outputs, subs, model.config.vocab_size, dev)
    if logits.shape[0]:  # back to the plan's row order (DualPipe's micro-batches regroup segments)
        wanted = [(i, k) for g in groups for i in g for k in range(int(plan.want_logits[i]))]
        order = sorted(range(len(wanted)), key=wanted.__getitem__)
        logits = logits.index_select(0, torch.tensor(order, dtype=torch.long, device=dev))
    return logits


def decoder_forward(model, index: StepIndex, ctx: PagedAttention, layer_ids: list[int],
                    h: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder layers `layer_ids` of the whole model over the step's tokens ([1, N, H]; embedded from
    `index.ids` when `h` is None), with the step's attention context (speculative decoding's forward)."""
    if h is None:
        h = model.model.embed_tokens(index.ids[None])
    cos, sin = index.rope(model, h.dtype)
    for li in layer_ids:
        h = model.model.layers[li](h, cos, sin, ctx)
    return h


def _microbatches(plan: StepPlan, directions: tuple[int, ...]) -> list[list[int]]:
    """The step's micro-batches as lists of the plan's segments, one per entry of the schedule's
    `directions` (the schedule runs every one; surplus ones are empty). Under DualPipe's mirrored placement
    a stage has two copies, one per direction, and a sequence's cached latents live on the ranks of the
    direction that computed them: a sequence keeps the direction of its first page's parity. A prefix-cache
    hit starts at the cached sequence's first page, so it stays in the direction that computed it too."""
    groups: list[list[int]] = [[] for _ in directions]
    for d in sorted(set(directions)):
        slots = [m for m, x in enumerate(directions) if x == d]
        mine = [i for i in range(len(plan)) if len(set(directions)) == 1 or plan.pages[i][0] % 2 == d]
        for m, part in zip(slots, plan.split_segments(mine, len(slots))):
            groups[m] = part
    return groups


def _stage_forward(stage, cache, index: StepIndex, layer_slots: dict[int, int], h: torch.Tensor | None
                   ) -> torch.Tensor:
    """One pipeline stage (parallel.pipeline.stages.PipelineStage) over one plan's `StepIndex`: the decoder
    layers with the paged attention context; on the last stage the wanted rows' fp32 logits. An empty
    micro-batch (a step with fewer sequences than the schedule's micro-batches) runs nothing: it is empty on
    every rank alike, so no collective is skipped on one rank only."""
    dev = index.ids.device
    if not index.n:
        if stage.is_last:
            return torch.zeros(0, 0, dtype=torch.float32, device=dev)  # no rows wanted: never delivered
        return h if h is not None else torch.zeros(1, 0, stage.embed_tokens.weight.shape[1], device=dev,
                                                   dtype=stage.embed_tokens.weight.dtype)
    ctx = PagedAttention(cache, index, layer_slots)
    if stage.is_first:
        h = stage.embed_tokens(index.ids[None])
    cos, sin = index.rope(stage, h.dtype)
    for layer in stage.layers.values():
        h = layer(h, cos, sin, ctx)
    if not stage.is_last:
        return h
    return stage.lm_head(stage.norm(h[0].index_select(0, index.want_rows))).float()


def _deliver_logits(pipe: PipeStage, outputs: dict[int, torch.Tensor], subs: list[StepPlan], vocab: int,
                    dev: torch.device) -> torch.Tensor:
    """The engine's rank collects each micro-batch's logits from the rank of its last stage (one p2p group
    per rank pair, in micro-batch order); others hand theirs over and return an empty tensor."""
    from cluster import p2p

    sched = pipe.executor.schedule
    last = sched.num_stages - 1
    src = {mb: sched.rank_of(last, mb) for mb in range(len(subs))}
    if not pipe.engine_pipe:
        return torch.zeros(0, vocab, dtype=torch.float32, device=dev)
    ops, got, ranks = [], {}, pipe.executor.pp_ranks  # p2p names peers by global rank
    for mb, sub in enumerate(subs):
        n = sum(sub.want_logits)
        if not n or src[mb] == 0 == pipe.pp_rank:
            continue
        if pipe.pp_rank == 0:
            got[mb] = torch.empty(n, vocab, dtype=torch.float32, device=dev)
            ops.append(p2p.Op("recv", got[mb], ranks[src[mb]], f"logits mb{mb}"))
        elif src[mb] == pipe.pp_rank:
            ops.append(p2p.Op("send", outputs[mb].contiguous(), ranks[0], f"logits mb{mb}"))
    if ops:
        for work in p2p.channel(pipe.group).post(ops):
            work.wait()
    if pipe.pp_rank != 0:
        return torch.zeros(0, vocab, dtype=torch.float32, device=dev)
    parts = [got.get(mb, outputs.get(mb)) for mb in range(len(subs)) if sum(subs[mb].want_logits)]
    return torch.cat(parts) if parts else torch.zeros(0, vocab, dtype=torch.float32, device=dev)
