"""One serving step's forward: prefill chunks and decode tokens of many sequences in one batched pass.

The step is described by a `StepPlan` of plain integers (token ids, positions, cache slots, per-sequence
segments and block tables), so rank 0 can broadcast it and every rank runs the same forward on its own
copy of the page pool. Token-wise work (embedding, projections, norms, MoE) runs once over all the step's
tokens; attention splits by segment: decode tokens (one new token after a cached prefix) use the absorbed
form straight over the paged latent cache (`ops.kernels.mla_decode_paged`: the Triton kernel on CUDA,
the torch reference elsewhere); prefill chunks use the expanded form over their sequence's gathered
latents, causal from their offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ops.kernels import mla_decode_paged
from ops.mla import absorb_query, mla_expanded, split_kv_b
from ops.paged_attention import gather_kv, write_kv_slots
from runtime.serve.cache import PagedLatentCache

__all__ = ["PipeStage", "StepPlan", "run_plan"]


@dataclass
class PipeStage:
    """This rank's place in a forward-only serving pipeline (global ranks for point-to-point sends).

    The stage runs decoder layers `layer_ids` (its page pool holds only those layers, in that order); the
    first stage embeds, the last applies the final norm and LM head. `logits_to` is the global rank the last
    stage sends the wanted logits rows to (the engine's rank), or None on stages that send none;
    `logits_from` is where the engine's rank receives them.
    """

    layer_ids: list[int]
    first: bool
    last: bool
    prev_rank: int | None = None
    next_rank: int | None = None
    logits_to: int | None = None
    logits_from: int | None = None
    micro: int = 1  # split each step into this many micro-batches, which flow through the stages together


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        return cls(**d)

    def __len__(self) -> int:
        return len(self.starts)

    def split(self, parts: int) -> list[StepPlan]:
        """Consecutive groups of segments with about equal token counts: the step's micro-batches."""
        total, out, cur, acc = len(self.ids), [], StepPlan(), 0
        for i in range(len(self)):
            s, n = self.starts[i], self.lens[i]
            cur.starts.append(len(cur.ids))
            for name in ("lens", "offsets", "pages", "want_logits"):
                getattr(cur, name).append(getattr(self, name)[i])
            for name in ("ids", "positions", "slots"):
                getattr(cur, name).extend(getattr(self, name)[s : s + n])
            acc += n
            if len(out) < parts - 1 and acc * parts >= total * (len(out) + 1) and i < len(self) - 1:
                out.append(cur)
                cur = StepPlan()
        out.append(cur)
        return out


def _is_decode(plan: StepPlan, i: int) -> bool:
    return plan.lens[i] == 1 and plan.offsets[i] > 0


@torch.no_grad()
def run_plan(model, cache: PagedLatentCache, plan: StepPlan, pipe: PipeStage | None = None) -> torch.Tensor:
    """Run the step; returns fp32 logits [n_wanted, V], one row per segment with want_logits, in order.

    With `pipe`, only this stage's layers run: hidden states come from the previous stage and go to the
    next; the logits reach the engine's rank from the last stage (other stages return an empty tensor).
    The step is cut into `pipe.micro` micro-batches; sends are asynchronous, so while stage s+1 works on
    micro-batch k, stage s already computes k+1 (every rank cuts the same plan the same way).
    """
    if pipe is None:
        return _run(model, cache, plan, None, [])
    import torch.distributed as dist

    works: list = []
    subs = plan.split(max(1, min(pipe.micro, len(plan))))
    outs = [_run(model, cache, sub, pipe, works) for sub in subs]
    if pipe.logits_from is not None and not pipe.last:  # the engine's rank: logits come back in order
        outs = []
        for sub in subs:
            logits = torch.empty(sum(sub.want_logits), model.config.vocab_size, dtype=torch.float32,
                                 device=model.lm_head.weight.device)
            if logits.shape[0]:
                dist.recv(logits, pipe.logits_from)
            outs.append(logits)
    for w in works:
        w.wait()
    return torch.cat(outs) if outs else torch.zeros(0, model.config.vocab_size)


def _run(model, cache: PagedLatentCache, plan: StepPlan, pipe: PipeStage | None, works: list) -> torch.Tensor:
    import torch.distributed as dist

    dev = model.lm_head.weight.device
    ids = torch.tensor(plan.ids, dtype=torch.long, device=dev)[None]
    positions = torch.tensor(plan.positions, dtype=torch.long, device=dev)
    slots = torch.tensor(plan.slots, dtype=torch.long, device=dev)
    n = ids.shape[1]
    decode = [i for i in range(len(plan)) if _is_decode(plan, i)]
    prefill = [i for i in range(len(plan)) if not _is_decode(plan, i)]
    dec_rows = torch.tensor([plan.starts[i] for i in decode], dtype=torch.long, device=dev)
    if decode:
        width = max(len(plan.pages[i]) for i in decode)
        table = torch.zeros(len(decode), width, dtype=torch.int32, device=dev)
        for j, i in enumerate(decode):
            table[j, : len(plan.pages[i])] = torch.tensor(plan.pages[i], dtype=torch.int32)
        seq_lens = torch.tensor([plan.offsets[i] + 1 for i in decode], dtype=torch.int32, device=dev)
        max_len = max(plan.offsets[i] + 1 for i in decode)
    page_rows = {i: torch.tensor(plan.pages[i], dtype=torch.long, device=dev) for i in prefill}

    dtype = model.lm_head.weight.dtype
    if pipe is None or pipe.first:
        h = model.model.embed_tokens(ids)
    else:
        h = torch.empty(1, n, model.config.hidden_size, dtype=dtype, device=dev)
        dist.recv(h, pipe.prev_rank)
    cos, sin = model.rotary(positions, h.dtype)
    r = cache.kv_lora_rank
    layer_ids = range(len(model.model.layers)) if pipe is None else pipe.layer_ids
    for ci, li in enumerate(layer_ids):
        layer = model.model.layers[li]
        attn = layer.self_attn
        q_nope, q_pe, latent, k_pe = attn.project(layer.input_layernorm(h), cos, sin)
        kv_pages = cache.layer(ci)
        write_kv_slots(kv_pages, slots, latent[0], k_pe[0])
        heads, dn = q_nope.shape[2], q_nope.shape[3]
        w = attn.kv_b_proj.weight
        out = q_nope.new_empty(n, heads, w.shape[0] // heads - dn)
        if decode:
            w_uk, w_uv = split_kv_b(w, heads, dn)
            q_lat = absorb_query(q_nope[:, dec_rows], w_uk)[0]  # [B, H, r]
            o_lat = mla_decode_paged(q_lat, q_pe[0, dec_rows], kv_pages, table, seq_lens, attn.scale,
                                     max_seq_len=max_len)
            out[dec_rows] = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
        for i in prefill:
            s, t, off = plan.starts[i], plan.lens[i], plan.offsets[i]
            lat, kpe = gather_kv(kv_pages, page_rows[i], off + t, r)
            o = mla_expanded(
                q_nope[:, s : s + t], q_pe[:, s : s + t], lat[None], kpe[None], w, attn.scale, q_offset=off
            )
            out[s : s + t] = o[0]
        h = h + attn.o_proj(out.reshape(1, n, -1))
        x = layer.post_attention_layernorm(h)
        if not layer.is_moe:
            h = h + layer.mlp(x)
        else:
            weights, idx = layer.gate_phase(x)
            recv_x, handle = layer.dispatch_phase(x, weights, idx)
            y = layer.expert_phase(recv_x, handle)
            h = layer.finish_phase(h, x, layer.combine_phase(y, handle))
    rows = [plan.starts[i] + plan.lens[i] - 1 for i in range(len(plan)) if plan.want_logits[i]]
    vocab = model.config.vocab_size
    if pipe is not None and not pipe.last:
        h = h.contiguous()
        works.append(dist.isend(h, pipe.next_rank))
        works.append(_Keep(h))
        return torch.zeros(0, vocab, dtype=torch.float32, device=dev)
    if not rows:
        return h.new_zeros(0, vocab, dtype=torch.float32)
    last = model.model.norm(h[0, torch.tensor(rows, dtype=torch.long, device=dev)])
    logits = model.head(last).float().contiguous()
    if pipe is not None and pipe.logits_to is not None and pipe.logits_to != dist.get_rank():
        works.append(dist.isend(logits, pipe.logits_to))
        works.append(_Keep(logits))
    return logits


class _Keep:
    """Holds a tensor alive until its asynchronous send has been waited for."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def wait(self) -> None:
        self.t = None
