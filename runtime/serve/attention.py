"""The attention side of a serving step: its index tensors, built once per step, and the `PagedAttention`
context the model's decoder layers call (`runtime.model.deepseek.MLA.forward`).

`StepIndex` turns a `StepPlan` into a constant number of tensors whatever the batch: token ids, positions and
cache slots (one tensor), the block-table rows the step changed (one indexed write into the cache's
persistent `BlockTable`), and per kind of segment what its attention reads:

* decode rows: every token of a segment of at most `MAX_DECODE_TOKENS` tokens after a cached prefix (a plain
  decode token, or the tokens a speculative step verifies) attends in the absorbed form straight over the
  paged latent cache, as one query row with its own length (`ops.kernels.mla_decode_paged`: Triton on CUDA,
  the torch reference elsewhere, whose gather index is computed here once for all layers);
* prefill chunks: batched over sequences, padded to one [sequences, chunk, keys] shape (sequences grouped so
  that padding at most doubles the work), expanded form with a causal mask from each chunk's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.kernels import kernel_backend, mla_decode_paged
from ops.mla import mla_expanded, split_kv_b
from ops.paged_attention import decode_index

__all__ = ["MAX_DECODE_TOKENS", "PagedAttention", "StepIndex", "apply_table_updates"]

MAX_DECODE_TOKENS = 8


@dataclass
class PrefillGroup:
    """Prefill chunks attended together: queries [G, T] over keys [G, S] (padded)."""

    q_tok: torch.Tensor        # [G*T] the step token of each query (padding repeats a real one)
    kv_slots: torch.Tensor     # [G*S] pool slot of each key (padding: slot 0, masked)
    mask: torch.Tensor | None  # [G, 1, T, S] visible keys; None: every chunk starts at 0 with T = S (causal)
    out_tok: torch.Tensor | None  # [R] step tokens of the real queries; None: no padding (all G*T are real)
    out_rows: torch.Tensor | None  # [R] their rows in the [G*T] query block
    shape: tuple[int, int, int]   # G, T, S


class StepIndex:
    """The tensors one step's attention needs, on `device`, built from `plan` (see the module docstring).
    Applies the plan's block-table changes to `cache.block_table` first."""

    def __init__(self, plan, cache, device: torch.device) -> None:
        ps = cache.page_size
        apply_table_updates(plan, cache)
        table = cache.block_table.table
        self.n = len(plan.ids)
        tok = torch.tensor([plan.ids, plan.positions, plan.slots], dtype=torch.long, device=device)
        self.ids, self.positions, self.slots = tok[0], tok[1], tok[2]

        dec_tok, dec_row, dec_len, prefill, want = [], [], [], [], []
        for i in range(len(plan)):
            s, t, off = plan.starts[i], plan.lens[i], plan.offsets[i]
            if off > 0 and t <= MAX_DECODE_TOKENS:
                dec_tok += range(s, s + t)
                dec_row += [plan.rows[i]] * t
                dec_len += range(off + 1, off + t + 1)
            else:
                prefill.append(i)
            w = int(plan.want_logits[i])
            want += range(s + t - w, s + t)
        self.want_rows = torch.tensor(want, dtype=torch.long, device=device)
        self.num_wanted = len(want)
        self.all_decode = len(dec_tok) == self.n and dec_tok == list(range(self.n))
        self.dec_tok = None
        if dec_tok:
            d = torch.tensor([dec_tok, dec_row, dec_len], dtype=torch.long, device=device)
            self.dec_tok = d[0]
            self.dec_table = table.index_select(0, d[1])
            self.dec_lens = d[2].to(torch.int32)
            self.dec_max = max(dec_len)
            self.dec_index = (decode_index(self.dec_table, d[2], ps, self.dec_max)
                              if kernel_backend(device) == "torch" else None)
        self.prefill = [self._group(plan, g, table, ps, device) for g in _groups(plan, prefill)]
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, model, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the step's positions (computed once, shared by every layer and the MTP pass)."""
        if self._rope is None or self._rope[0].dtype != dtype:
            self._rope = model.rotary(self.positions, dtype)
        return self._rope

    @staticmethod
    def _group(plan, segs: list[int], table: torch.Tensor, ps: int, device) -> PrefillGroup:
        lens = [plan.lens[i] for i in segs]
        offs = [plan.offsets[i] for i in segs]
        starts = [plan.starts[i] for i in segs]
        g, t = len(segs), max(lens)
        s = max(o + n for o, n in zip(offs, lens))
        meta = torch.tensor([[plan.rows[i] for i in segs], offs, lens, starts], dtype=torch.long, device=device)
        rows, off, ln, st = meta
        t_ar, s_ar = torch.arange(t, device=device), torch.arange(s, device=device)
        q_tok = st[:, None] + torch.minimum(t_ar[None, :], ln[:, None] - 1)
        key_ok = s_ar[None, :] < (off + ln)[:, None]
        pages = table.index_select(0, rows)[:, s_ar // ps].long()
        kv_slots = torch.where(key_ok, pages * ps + s_ar % ps, 0)
        causal = all(o == 0 for o in offs) and all(n == t for n in lens)
        mask = None
        if not causal:
            sees = s_ar[None, None, :] <= (off[:, None] + t_ar[None, :])[:, :, None]   # [G, T, S]
            mask = (sees & key_ok[:, None, :])[:, None]
        out_tok = out_rows = None
        if any(n != t for n in lens):
            out_tok = torch.tensor([x for a, n in zip(starts, lens) for x in range(a, a + n)], device=device)
            out_rows = torch.tensor([j * t + x for j, n in enumerate(lens) for x in range(n)], device=device)
        return PrefillGroup(q_tok.reshape(-1), kv_slots.reshape(-1), mask, out_tok, out_rows, (g, t, s))


def apply_table_updates(plan, cache) -> None:
    """Write the pages the plan's segments added to their block-table rows (one indexed write)."""
    rows, cols, vals = [], [], []
    for r, f, pages in zip(plan.rows, plan.table_from, plan.pages):
        if f < len(pages):
            rows += [r] * (len(pages) - f)
            cols += range(f, len(pages))
            vals += pages[f:]
    cache.block_table.update(rows, cols, vals)


def _groups(plan, segs: list[int]) -> list[list[int]]:
    """Prefill segments in batches whose padded size stays within twice their real size (longest first)."""
    order = sorted(segs, key=lambda i: -(plan.offsets[i] + plan.lens[i]))
    out: list[list[int]] = []
    for i in order:
        if out:
            cur = out[-1] + [i]
            t = max(plan.lens[j] for j in cur)
            s = max(plan.offsets[j] + plan.lens[j] for j in cur)
            real_q = sum(plan.lens[j] for j in cur)
            real_kv = sum(plan.offsets[j] + plan.lens[j] for j in cur)
            if len(cur) * t <= 2 * real_q and len(cur) * s <= 2 * real_kv:
                out[-1] = cur
                continue
        out.append([i])
    return out


class PagedAttention:
    """The attention context of one serving step: writes the step's latents into the page pool and attends
    each token over its sequence's cached prefix. `layer_slots` maps a decoder layer id to its index in the
    pool (a pipeline stage's pool holds only its layers; an MTP module has a slot of its own)."""

    def __init__(self, cache, index: StepIndex, layer_slots: dict[int, int]) -> None:
        self.cache, self.index, self.layer_slots = cache, index, layer_slots

    def attend(self, layer_idx: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [1,N,h,dn], q_pe [1,N,h,dr], latent [1,N,r], k_pe [1,N,dr] -> out [1,N,h,dv]."""
        idx = self.index
        kv_pages = self.cache.layer(self.layer_slots[layer_idx])
        width = kv_pages.shape[-1]
        rows = torch.cat([latent[0], k_pe[0]], -1)
        rows = rows if rows.dtype == kv_pages.dtype else rows.to(kv_pages.dtype)
        kv_pages.view(-1, width).index_copy_(0, idx.slots, rows)
        q_nope, q_pe = q_nope[0], q_pe[0]
        n, heads, dn = q_nope.shape
        w = attn.kv_b_proj.weight
        if idx.all_decode:
            return self._decode(attn, q_nope, q_pe, kv_pages, w)[None]
        out = q_nope.new_empty(n, heads, w.shape[0] // heads - dn)
        if idx.dec_tok is not None:
            sel = idx.dec_tok
            out.index_copy_(0, sel, self._decode(attn, q_nope.index_select(0, sel), q_pe.index_select(0, sel),
                                                 kv_pages, w))
        r = self.cache.kv_lora_rank
        for grp in idx.prefill:
            g, t, s = grp.shape
            kv = kv_pages.view(-1, width).index_select(0, grp.kv_slots).view(g, s, width)
            qn = q_nope.index_select(0, grp.q_tok).view(g, t, heads, dn)
            qp = q_pe.index_select(0, grp.q_tok).view(g, t, heads, -1)
            o = mla_expanded(qn, qp, kv[..., :r], kv[..., r:], w, attn.scale, mask=grp.mask)
            o = o.reshape(g * t, heads, -1)
            if grp.out_tok is None:
                out.index_copy_(0, grp.q_tok, o)
            else:
                out.index_copy_(0, grp.out_tok, o.index_select(0, grp.out_rows))
        return out[None]

    def _decode(self, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, w: torch.Tensor
                ) -> torch.Tensor:
        idx, heads = self.index, q_nope.shape[1]
        w_uk, w_uv = split_kv_b(w, heads, q_nope.shape[2])
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r] = W_UK^T q_nope per head
        o_lat = mla_decode_paged(q_lat, q_pe, kv_pages, idx.dec_table, idx.dec_lens, attn.scale,
                                 max_seq_len=idx.dec_max, index=idx.dec_index)
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, dv]
