"""One serving step: its plan, its forward over the paged latent cache, and the sampling of its tokens.

The step is described by a `StepPlan` of plain integers (token ids, positions, cache slots, per-sequence
segments and block tables), so the driver rank can broadcast it (one wire encoding: a flat int64 tensor over
the control group) and every rank runs the same forward on its own copy of the page pool. The forward is the
model's own decoder layers (`DecoderLayer.forward`) with a `PagedAttention` context: token-wise work
(embedding, projections, norms, MoE with its all-to-all) runs once over all the step's tokens; attention
splits by segment: decode tokens (one new token after a cached prefix) use the absorbed form straight over
the paged latent cache (`ops.kernels.mla_decode_paged`: Triton on CUDA, the torch reference elsewhere);
prefill chunks use the expanded form over their sequence's gathered latents, causal from their offset.

Sampling (greedy, temperature, top-k, top-p, with a per-request generator so a seed reproduces the samples
whatever else is in the batch) and log-probabilities of the model's own distribution run on the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ops.kernels import mla_decode_paged
from ops.mla import absorb_query, mla_expanded, split_kv_b
from ops.paged_attention import gather_kv, write_kv_slots

__all__ = ["MAX_PLAN_INTS", "PagedAttention", "PipeStage", "SamplingParams", "StepPlan", "logprobs_of",
           "make_generator", "run_plan", "sample"]

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (dividing by it overflows float32 logits)
MAX_PLAN_INTS = 8 << 20  # one broadcast plan: a few integers per scheduled token and page


# --- sampling -------------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    logprobs: int = 0  # 0: none; k in 1..20: chosen token's logprob + the k best
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a logits row [V] (fp32). A temperature below `GREEDY_BELOW` is greedy, and the most
    likely token always stays in the top-p nucleus, so any valid parameters give a computable distribution."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False  # even when top_p rounds to 0 in float32
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[list[float]]]:
    """(log p(token), [[id, logprob] x k best]) under log_softmax of the raw logits (before temperature)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k > 0 else None
    best = [] if top is None else [[int(i), float(v)] for v, i in zip(top.values, top.indices)]
    return float(lp[token]), best


# --- the plan --------------------------------------------------------------------------------------------------
_TOKEN_FIELDS = ("ids", "positions", "slots")
_SEGMENT_FIELDS = ("starts", "lens", "offsets")


@dataclass
class StepPlan:
    """Segments in order; segment i covers tokens [starts[i], starts[i] + lens[i]) of the flat token list.

    `offsets[i]` is the number of tokens of that sequence already cached (its first position), `pages[i]`
    the sequence's page ids, `want_logits[i]` whether its last token's logits are needed (the chunk ends
    the known tokens, so a new token is sampled).
    """

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    pages: list[list[int]] = field(default_factory=list)
    want_logits: list[bool] = field(default_factory=list)

    def add(self, tokens: list[int], offset: int, pages: list[int], page_size: int, want: bool) -> None:
        self.starts.append(len(self.ids))
        self.lens.append(len(tokens))
        self.offsets.append(offset)
        self.pages.append(list(pages))
        self.want_logits.append(want)
        self.ids.extend(tokens)
        for p in range(offset, offset + len(tokens)):
            self.positions.append(p)
            self.slots.append(pages[p // page_size] * page_size + p % page_size)

    def __len__(self) -> int:
        return len(self.starts)

    def is_decode(self, i: int) -> bool:
        return self.lens[i] == 1 and self.offsets[i] > 0

    def select(self, segments: list[int]) -> StepPlan:
        """The plan of these segments (in this order)."""
        out = StepPlan()
        for i in segments:
            s, n = self.starts[i], self.lens[i]
            out.starts.append(len(out.ids))
            for name in ("lens", "offsets", "pages", "want_logits"):
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
        want = [bool(w) for w in flat[pos : pos + n_seg]]
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


# --- attention over the page pool ------------------------------------------------------------------------------
class PagedAttention:
    """The attention context of one serving step (see `runtime.model.deepseek.MLA.forward`): writes the
    step's latents into the page pool and attends each segment over its cached prefix. `layer_slots` maps a
    decoder layer id to its index in the pool (a pipeline stage's pool holds only its layers)."""

    def __init__(self, cache, plan: StepPlan, layer_slots: dict[int, int], device: torch.device) -> None:
        self.cache, self.plan, self.layer_slots = cache, plan, layer_slots
        self.slots = torch.tensor(plan.slots, dtype=torch.long, device=device)
        self.decode = [i for i in range(len(plan)) if plan.is_decode(i)]
        self.prefill = [i for i in range(len(plan)) if not plan.is_decode(i)]
        self.dec_rows = torch.tensor([plan.starts[i] for i in self.decode], dtype=torch.long, device=device)
        if self.decode:
            width = max(len(plan.pages[i]) for i in self.decode)
            self.table = torch.zeros(len(self.decode), width, dtype=torch.int32, device=device)
            for j, i in enumerate(self.decode):
                self.table[j, : len(plan.pages[i])] = torch.tensor(plan.pages[i], dtype=torch.int32, device=device)
            self.seq_lens = torch.tensor([plan.offsets[i] + 1 for i in self.decode], dtype=torch.int32,
                                         device=device)
            self.max_len = max(plan.offsets[i] + 1 for i in self.decode)
        self.page_rows = {i: torch.tensor(plan.pages[i], dtype=torch.long, device=device) for i in self.prefill}

    def attend(self, layer_idx: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [1,N,h,dn], q_pe [1,N,h,dr], latent [1,N,r], k_pe [1,N,dr] -> out [1,N,h,dv]."""
        plan, r = self.plan, self.cache.kv_lora_rank
        kv_pages = self.cache.layer(self.layer_slots[layer_idx])
        write_kv_slots(kv_pages, self.slots, latent[0], k_pe[0])
        n, heads, dn = q_nope.shape[1], q_nope.shape[2], q_nope.shape[3]
        w = attn.kv_b_proj.weight
        out = q_nope.new_empty(n, heads, w.shape[0] // heads - dn)
        if self.decode:
            w_uk, w_uv = split_kv_b(w, heads, dn)
            q_lat = absorb_query(q_nope[:, self.dec_rows], w_uk)[0]  # [B, H, r]
            o_lat = mla_decode_paged(q_lat, q_pe[0, self.dec_rows], kv_pages, self.table, self.seq_lens,
                                     attn.scale, max_seq_len=self.max_len)
            out[self.dec_rows] = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
        for i in self.prefill:
            s, t, off = plan.starts[i], plan.lens[i], plan.offsets[i]
            lat, kpe = gather_kv(kv_pages, self.page_rows[i], off + t, r)
            o = mla_expanded(q_nope[:, s : s + t], q_pe[:, s : s + t], lat[None], kpe[None], w, attn.scale,
                             q_offset=off)
            out[s : s + t] = o[0]
        return out[None]


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
        n = len(model.model.layers)
        stage = stage or model.pipeline_stage(0, 1, range(n))
        return _stage_forward(stage, cache, plan, {li: li for li in range(n)}, None, dev)
    slots = {li: i for i, li in enumerate(pipe.layer_ids)}
    groups = _microbatches(plan, pipe.executor.schedule.directions)
    subs = [plan.select(g) for g in groups]
    hidden = model.config.hidden_size
    outputs = pipe.executor.run_forward_with(
        lambda stage, mb, x: _stage_forward(stage, cache, subs[mb], slots, x, dev),
        lambda mb: (1, len(subs[mb].ids), hidden), model.lm_head.weight.dtype, dev)
    logits = _deliver_logits(pipe, outputs, subs, model.config.vocab_size, dev)
    if logits.shape[0]:  # back to the plan's segment order (DualPipe's micro-batches regroup segments)
        wanted = [i for g in groups for i in g if plan.want_logits[i]]
        logits = logits[torch.tensor(sorted(range(len(wanted)), key=wanted.__getitem__), device=dev)]
    return logits


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


def _stage_forward(stage, cache, plan: StepPlan, layer_slots: dict[int, int], h: torch.Tensor | None,
                   dev: torch.device) -> torch.Tensor:
    """One pipeline stage (parallel.pipeline.stages.PipelineStage) over one plan: the decoder layers with
    the paged attention context; on the last stage the wanted rows' fp32 logits. An empty micro-batch (a step
    with fewer sequences than the schedule's micro-batches) runs nothing: it is empty on every rank alike, so
    no collective is skipped on one rank only."""
    if not plan.ids:
        if stage.is_last:
            return torch.zeros(0, 0, dtype=torch.float32, device=dev)  # no rows wanted: never delivered
        return h if h is not None else torch.zeros(1, 0, stage.embed_tokens.weight.shape[1], device=dev,
                                                   dtype=stage.embed_tokens.weight.dtype)
    ctx = PagedAttention(cache, plan, layer_slots, dev)
    if stage.is_first:
        h = stage.embed_tokens(torch.tensor(plan.ids, dtype=torch.long, device=dev)[None])
    cos, sin = stage.rotary(torch.tensor(plan.positions, dtype=torch.long, device=dev), h.dtype)
    for layer in stage.layers.values():
        h = layer(h, cos, sin, ctx)
    if not stage.is_last:
        return h
    rows = torch.tensor([plan.starts[i] + plan.lens[i] - 1 for i in range(len(plan)) if plan.want_logits[i]],
                        dtype=torch.long, device=dev)
    return stage.lm_head(stage.norm(h[0, rows])).float()


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
