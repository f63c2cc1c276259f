"""One serving step: its plan and its forward over the paged latent cache.

The step is described by a `StepPlan` of plain integers (token ids, positions, cache slots, per-sequence
segments, page lists and block-table rows), so the driver rank can broadcast it (one wire encoding: a flat
int64 tensor over the control group) and every rank runs the same forward on its own copy of the page pool.
The forward is the model's own decoder layers (`DecoderLayer.forward`) with the `PagedAttention` context of
`runtime/serve/attention.py`: token-wise work (embedding, projections, norms, MoE with its all-to-all) runs
once over all the step's tokens; attention splits by segment (decode rows over the paged cache in the absorbed
form, prefill chunks batched over sequences in the expanded form), from index tensors built once per step.

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

    def split(self, parts: int) -> list[StepPlan]:
        """Consecutive groups of segments with about equal token counts: the step's micro-batches."""
        total, out, cur, acc = len(self.ids), [], StepPlan(), 0
        for i in range(len(self)):
            s, n = self.starts[i], self.lens[i]
            cur.starts.append(len(cur.ids))
            for name in ("lens", "offsets", "rows", "table_from", "pages", "want_logits"):
                getattr(cur, name).append(getattr(self, name)[i])
            for name in _TOKEN_FIELDS:
                getattr(cur, name).extend(getattr(self, name)[s : s + n])
            acc += n
            if len(out) < parts - 1 and acc * parts >= total * (len(out) + 1) and i < len(self) - 1:
                out.append(cur)
                cur = StepPlan()
        out.append(cur)
        return out

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
        bcast(torch.tensor([len(flat)], dtype=torch.int64))
        bcast(torch.tensor(flat, dtype=torch.int64))

    @staticmethod
    def broadcast_none(bcast: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Driver side: this serving step ran nothing (the followers' `receive` returns None)."""
        bcast(torch.zeros(1, dtype=torch.int64))

    @classmethod
    def receive(cls, bcast: Callable[[torch.Tensor], torch.Tensor]) -> StepPlan | None:
        """Follower side of `broadcast` / `broadcast_none`; a length outside the bound is refused before
        anything is allocated for it (a corrupt or mismatched sender)."""
        n = int(bcast(torch.zeros(1, dtype=torch.int64))[0])
        if n == 0:
            return None
        if not 2 <= n <= MAX_PLAN_INTS:
            raise ValueError(f"broadcast step plan length {n} is outside [2, {MAX_PLAN_INTS}] (MAX_PLAN_INTS): "
                             "a corrupt or mismatched sender")
        return cls.decode(bcast(torch.zeros(n, dtype=torch.int64)).tolist())


# --- the forward ------------------------------------------------------------------------------------------------
@dataclass
class PipeStage:
    """This rank's place in a forward-only serving pipeline.

    The stage runs decoder layers `layer_ids` (its page pool holds only those layers, in that order); the
    first stage embeds, the last applies the final norm and LM head. `group` is the pipeline's process group
    (`mesh.group("pp")`) and `prev`, `next`, `logits_to`, `logits_from` are group ranks: the neighbours, the
    rank the last stage sends the wanted logits rows to (the engine's), and where the engine's rank receives
    them (None where a rank sends or receives none)."""

    layer_ids: list[int]
    first: bool
    last: bool
    group: object = None
    prev: int | None = None
    next: int | None = None
    logits_to: int | None = None
    logits_from: int | None = None
    micro: int = 1  # split each step into this many micro-batches, which flow through the stages together


@torch.no_grad()
def run_plan(model, cache, plan: StepPlan, pipe: PipeStage | None = None) -> torch.Tensor:
    """Run the step; returns fp32 logits [n_wanted, V], one row per segment with want_logits, in order.

    With `pipe`, only this stage's layers run: hidden states come from the previous stage and go to the
    next; the logits reach the engine's rank from the last stage (other stages return an empty tensor).
    The step is cut into `pipe.micro` micro-batches; sends are asynchronous, so while stage s+1 works on
    micro-batch k, stage s already computes k+1 (every rank cuts the same plan the same way).
    """
    if pipe is None:
        return _forward(model, cache, plan, None, [])
    import torch.distributed as dist

    works: list = []
    subs = plan.split(max(1, min(pipe.micro, len(plan))))
    outs = [_forward(model, cache, sub, pipe, works) for sub in subs]
    if pipe.logits_from is not None and not pipe.last:  # the engine's rank: logits come back in order
        outs = []
        for sub in subs:
            logits = torch.empty(sum(sub.want_logits), model.config.vocab_size, dtype=torch.float32,
                                 device=model.lm_head.weight.device)
            if logits.shape[0]:
                dist.recv(logits, group=pipe.group, group_src=pipe.logits_from)
            outs.append(logits)
    for work, _ in works:
        work.wait()
    return torch.cat(outs) if outs else torch.zeros(0, model.config.vocab_size)


def decoder_forward(model, index: StepIndex, ctx: PagedAttention, layer_ids: list[int],
                    h: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder layers `layer_ids` over the step's tokens ([1, N, H]; embedded from `index.ids` when `h`
    is None), with the step's attention context."""
    if h is None:
        h = model.model.embed_tokens(index.ids[None])
    cos, sin = index.rope(model, h.dtype)
    for li in layer_ids:
        h = model.model.layers[li](h, cos, sin, ctx)
    return h


def _forward(model, cache, plan: StepPlan, pipe: PipeStage | None, works: list) -> torch.Tensor:
    import torch.distributed as dist

    dev = model.lm_head.weight.device
    layer_ids = list(range(len(model.model.layers))) if pipe is None else pipe.layer_ids
    index = StepIndex(plan, cache, dev)
    ctx = PagedAttention(cache, index, {li: i for i, li in enumerate(layer_ids)})
    n = len(plan.ids)
    h = None
    if pipe is not None and not pipe.first:
        h = torch.empty(1, n, model.config.hidden_size, dtype=model.lm_head.weight.dtype, device=dev)
        dist.recv(h, group=pipe.group, group_src=pipe.prev)
    h = decoder_forward(model, index, ctx, layer_ids, h)
    vocab = model.config.vocab_size
    if pipe is not None and not pipe.last:
        h = h.contiguous()
        works.append((dist.isend(h, group=pipe.group, group_dst=pipe.next), h))
        return torch.zeros(0, vocab, dtype=torch.float32, device=dev)
    if not index.num_wanted:
        return h.new_zeros(0, vocab, dtype=torch.float32)
    logits = model.head(model.model.norm(h[0].index_select(0, index.want_rows))).float()
    if pipe is not None and pipe.logits_to is not None:
        logits = logits.contiguous()
        works.append((dist.isend(logits, group=pipe.group, group_dst=pipe.logits_to), logits))
    return logits
