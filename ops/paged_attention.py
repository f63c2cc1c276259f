"""Paged latent KV cache for MLA decode: the layout, scatter helpers, and the torch reference decode.

Layout (the serving engine and the Triton kernel `ops/triton/mla_decode.py` share it exactly):

* per layer `kv_pages [num_pages, page_size, kv_lora_rank + qk_rope_head_dim]`: the normalised latent `c_kv`
  in the first `kv_lora_rank` columns, the rotated `k_pe` in the last `qk_rope_head_dim` (576 wide for V3,
  one row per token: MLA's whole per-token cache).
* `block_table int32 [B, max_pages_per_seq]`: the page ids of each sequence, in order; entries past a
  sequence's last page may hold any value (they are never read).
* `seq_lens int32 [B]`: valid cached tokens per sequence, including the token being decoded (the caller has
  already written it). Token `p` of sequence `b` lives at `kv_pages[block_table[b, p // page_size],
  p % page_size]`.

Decode is the absorbed MLA form (see `ops/mla.py`): the query arrives already multiplied by W_UK
(`q_latent = W_UK^T q_nope`), attention runs over the latent cache as one shared KV head whose values are the
first `kv_lora_rank` columns, and the caller applies W_UV to the returned latent output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_width(kv_lora_rank: int, rope_dim: int) -> int:
    """Row width of one cached token (kv_lora_rank + qk_rope_head_dim)."""
    return kv_lora_rank + rope_dim


def new_kv_pages(num_pages: int, page_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed page pool for one layer: [num_pages, page_size, kv_lora_rank + rope_dim]."""
    if num_pages <= 0 or page_size <= 0:
        raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
    return torch.zeros(num_pages, page_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat slot index (page * page_size + offset) of each token; positions [B, T] (or [B]); -1 stays -1.

    Negative positions mark padding: their slot is -1 and `write_kv_slots` skips them.
    """
    if positions.dim() == 1:
        positions = positions[:, None]
    if positions.dim() != 2 or positions.shape[0] != block_table.shape[0]:
        raise ValueError(
            f"positions must be [B] or [B, T] with B = block_table rows ({block_table.shape[0]}), "
            f"got {tuple(positions.shape)}"
        )
    pos = positions.long()
    valid = pos >= 0
    page_idx = torch.where(valid, pos // page_size, 0)
    if bool((page_idx >= block_table.shape[1]).any()):
        raise ValueError(
            f"position {int(pos.max())} needs page index {int(page_idx.max())} but block_table has only "
            f"{block_table.shape[1]} columns (page_size {page_size})"
        )
    pages = torch.gather(block_table.long(), 1, page_idx)
    slots = pages * page_size + pos % page_size
    return torch.where(valid, slots, torch.full_like(slots, -1))


def write_kv_slots(
    kv_pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor
) -> None:
    """Scatter tokens into the page pool at flat `slots` [N] (-1 = skip); latent [N, r], k_pe [N, dr]."""
    num_pages, page_size, width = kv_pages.shape
    r, dr = latent.shape[-1], k_pe.shape[-1]
    if r + dr != width:
        raise ValueError(f"latent width {r} + k_pe width {dr} != kv_pages row width {width}")
    slots = slots.reshape(-1).long()
    latent = latent.reshape(-1, r)
    k_pe = k_pe.reshape(-1, dr)
    if not (slots.shape[0] == latent.shape[0] == k_pe.shape[0]):
        raise ValueError(
            f"slots ({slots.shape[0]}), latent ({latent.shape[0]}) and k_pe ({k_pe.shape[0]}) rows differ"
        )
    keep = slots >= 0
    if bool((slots[keep] >= num_pages * page_size).any()):
        raise ValueError(f"slot {int(slots.max())} is outside the pool ({num_pages} pages x {page_size})")
    flat = kv_pages.view(num_pages * page_size, width)
    rows = torch.cat([latent[keep], k_pe[keep]], dim=-1).to(kv_pages.dtype)
    flat.index_copy_(0, slots[keep], rows)


def write_kv(
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
) -> None:
    """Write new tokens of each sequence into its pages (in place).

    positions [B, T] (or [B] for one token each; negative = padding, skipped), latent [B, T, r] (or [B, r]),
    k_pe [B, T, dr] (or [B, dr]): the normalised latent and the rotated k_pe as `MLA.project` returns them.
    """
    slots = slot_mapping(block_table, positions, kv_pages.shape[1])
    write_kv_slots(kv_pages, slots, latent, k_pe)


def gather_kv(
    kv_pages: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, kv_lora_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cache as contiguous (latent [S, r], k_pe [S, dr]), e.g. for prefill over the cache."""
    page_size = kv_pages.shape[1]
    n_pages = -(-seq_len // page_size)
    if n_pages > block_table_row.shape[0]:
        raise ValueError(f"seq_len {seq_len} needs {n_pages} pages, block table row has {len(block_table_row)}")
    rows = kv_pages[block_table_row[:n_pages].long()].reshape(-1, kv_pages.shape[-1])[:seq_len]
    return rows[:, :kv_lora_rank], rows[:, kv_lora_rank:]


def check_decode_args(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    check_values: bool = True,
) -> None:
    """Shape/dtype checks shared by the torch and Triton decode; raises ValueError naming the problem.

    `check_values=False` skips the checks that read seq_lens (a device sync on GPU).
    """
    if q_latent.dim() != 3 or q_pe.dim() != 3:
        raise ValueError(
            f"q_latent must be [B, H, r] and q_pe [B, H, dr], got {tuple(q_latent.shape)}, {tuple(q_pe.shape)}"
        )
    b, h, r = q_latent.shape
    if q_pe.shape[:2] != (b, h):
        raise ValueError(f"q_pe batch/heads {tuple(q_pe.shape[:2])} != q_latent's {(b, h)}")
    if kv_pages.dim() != 3 or kv_pages.shape[-1] != r + q_pe.shape[-1]:
        raise ValueError(
            f"kv_pages must be [num_pages, page_size, r + dr] = [.., .., {r + q_pe.shape[-1]}], "
            f"got {tuple(kv_pages.shape)}"
        )
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [B={b}, max_pages], got {tuple(block_table.shape)}")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be [B={b}], got {tuple(seq_lens.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table/seq_lens must be int32, got {block_table.dtype}, {seq_lens.dtype}")
    if not check_values:
        return
    cap = block_table.shape[1] * kv_pages.shape[1]
    if b and int(seq_lens.max()) > cap:
        raise ValueError(
            f"seq_len {int(seq_lens.max())} exceeds block_table capacity {block_table.shape[1]} pages x "
            f"{kv_pages.shape[1]} tokens"
        )
    if b and int(seq_lens.min()) < 0:
        raise ValueError("seq_lens must be >= 0")


@dataclass
class DecodeIndex:
    """What the torch decode reads for a batch, computed once and reused by every layer of a step:
    `slots` [B * S] (long: the pool row of token s of sequence b, S = whole pages covering the longest
    sequence; past a sequence's length, a row of page 0) and `hidden` [B, 1, S] (True where token s is not
    cached: s >= seq_lens[b])."""

    slots: torch.Tensor
    hidden: torch.Tensor


def decode_index(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, max_seq_len: int) -> DecodeIndex:
    """The `DecodeIndex` of block_table [B, >= P] and seq_lens [B] (each <= max_seq_len)."""
    n_pages = max(1, -(-max_seq_len // page_size))
    dev = block_table.device
    lens = seq_lens.long()
    # Unused block-table entries may be garbage: read page 0 there, the mask hides it.
    used = torch.arange(n_pages, device=dev)[None, :] * page_size < lens[:, None]
    pages = torch.where(used, block_table[:, :n_pages].long(), 0)
    slots = (pages[:, :, None] * page_size + torch.arange(page_size, device=dev)).reshape(-1)
    hidden = torch.arange(n_pages * page_size, device=dev)[None, :] >= lens[:, None]
    return DecodeIndex(slots, hidden[:, None, :])


def mla_decode_indexed(
    q_latent: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, index: DecodeIndex, softmax_scale: float
) -> torch.Tensor:
    """`mla_decode_paged` over a precomputed `DecodeIndex` (no argument checks, no host reads)."""
    b, h, r = q_latent.shape
    if b == 0:
        return q_latent.new_zeros(b, h, r)
    width = kv_pages.shape[-1]
    kv = _f32(kv_pages.view(-1, width).index_select(0, index.slots).view(b, -1, width))  # [B, S, r+dr]
    # one product over the whole row: q_latent.c + q_pe.k_pe = [q_latent ; q_pe] . [c ; k_pe]
    scores = torch.bmm(torch.cat([_f32(q_latent), _f32(q_pe)], dim=-1), kv.transpose(1, 2)) * softmax_scale
    probs = torch.softmax(scores.masked_fill(index.hidden, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # seq_len 0: all -inf -> zeros
    out = torch.bmm(probs, kv[..., :r])
    return out if out.dtype == q_latent.dtype else out.to(q_latent.dtype)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def mla_decode_paged(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode, one query token per sequence, over the paged latent cache (torch reference).

    q_latent [B, H, r] (= W_UK^T q_nope), q_pe [B, H, dr] (rotated). Returns out_latent [B, H, r] in
    q_latent's dtype: softmax over the sequence's cached tokens of (q_latent.c + q_pe.k_pe) * scale, applied
    to c. Scores, softmax and the weighted sum run in fp32. A sequence with seq_len 0 gets zeros.
    """
    check_decode_args(q_latent, q_pe, kv_pages, block_table, seq_lens)
    if q_latent.shape[0] == 0:
        return q_latent.new_zeros(q_latent.shape)
    index = decode_index(block_table, seq_lens.to(kv_pages.device), kv_pages.shape[1], int(seq_lens.max()))
    return mla_decode_indexed(q_latent, q_pe, kv_pages, index, softmax_scale)
