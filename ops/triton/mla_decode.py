"""MLA decode over the paged latent cache (absorbed form), twin of `ops.paged_attention.mla_decode_paged`.

Flash-decoding in two kernels:

1. `_split_kernel`, grid (B, head blocks, splits): each program takes BLOCK_H query heads of one sequence
   and one slice of its KV length, streams the slice in BLOCK_N-token tiles with an online softmax, and
   writes a normalised partial output [BLOCK_H, r] plus its log-sum-exp. All heads share the one latent KV
   "head", so a tile of cache is loaded once for BLOCK_H heads (MLA decode is a GEMM, not a GEMV).
2. `_reduce_kernel`, grid (B, H): combines the partials of the splits with their log-sum-exps.

Tokens are addressed through the block table one row at a time (page = table[pos // page_size]), so a tile
may span several pages or part of one: any page size works, whether it divides BLOCK_N or not.
Scores, softmax and accumulation are fp32; with 16-bit inputs the probabilities are cast to the input dtype
for the P.V product, as FlashAttention does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.paged_attention import check_decode_args
from ops.triton.common import check_device, dot_precision

MAX_SPLITS = 64  # the reduction holds all splits of one (sequence, head) in one block


@triton.jit
def _split_kernel(
    q_ptr, qpe_ptr, kv_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr, scale,
    s_qb, s_qh, s_pb, s_ph, s_btb, s_ob, s_oh, s_os, s_lb, s_lh,
    H, R, DR, page_size, width, chunk,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    start = sp * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DR)
    mh = offs_h < H
    mr = offs_r < R
    md = offs_d < DR
    q = tl.load(q_ptr + b * s_qb + offs_h[:, None] * s_qh + offs_r[None, :], mask=mh[:, None] & mr[None, :], other=0.0)
    qpe = tl.load(
        qpe_ptr + b * s_pb + offs_h[:, None] * s_ph + offs_d[None, :], mask=mh[:, None] & md[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < end
        page = tl.load(bt_ptr + b * s_btb + offs_n // page_size, mask=mn, other=0).to(tl.int64)
        row = (page * page_size + offs_n % page_size) * width
        c = tl.load(kv_ptr + row[:, None] + offs_r[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
        kpe = tl.load(kv_ptr + row[:, None] + R + offs_d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(c), input_precision=PRECISION)
        qk += tl.dot(qpe, tl.trans(kpe), input_precision=PRECISION)
        qk = tl.where(mn[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        o_ptr + b * s_ob + offs_h[:, None] * s_oh + sp * s_os + offs_r[None, :], out, mask=mh[:, None] & mr[None, :]
    )
    tl.store(lse_ptr + b * s_lb + offs_h * s_lh + sp, lse, mask=mh)


@triton.jit
def _reduce_kernel(
    o_ptr, lse_ptr, out_ptr, n_splits, R, s_ob, s_oh, s_os, s_lb, s_lh, s_outb, s_outh,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    mr = offs_r < R
    ms = offs_s < n_splits
    # All splits' log-sum-exps at once (no loop-carried scalars); empty splits hold -inf.
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_s, mask=ms, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S], 0 for empty splits
    o = tl.load(
        o_ptr + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_r[None, :], mask=ms[:, None] & mr[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * s_outb + h * s_outh + offs_r, out.to(out_ptr.dtype.element_ty), mask=mr)


def mla_decode_paged(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int = 32,
    block_h: int = 16,
) -> torch.Tensor:
    """Triton absorbed-MLA decode; same arguments and result as `ops.paged_attention.mla_decode_paged`.

    `num_splits` (default: enough programs to fill the GPU, at most one per BLOCK_N tokens) splits each
    sequence's KV length. `max_seq_len` (must be >= max(seq_lens); tokens past it are not read) avoids a
    device sync to read max(seq_lens), e.g. under CUDA graphs.
    """
    check_device(q_latent, q_pe, kv_pages, block_table, seq_lens)
    # With max_seq_len given, skip the checks that read seq_lens (no device sync; CUDA-graph safe).
    check_decode_args(q_latent, q_pe, kv_pages, block_table, seq_lens, check_values=max_seq_len is None)
    if kv_pages.stride(-1) != 1 or kv_pages.stride(1) != kv_pages.shape[-1] or kv_pages.stride(0) != (
        kv_pages.shape[1] * kv_pages.shape[-1]
    ):
        raise ValueError("kv_pages must be contiguous [num_pages, page_size, width]")
    b, h, r = q_latent.shape
    dr = q_pe.shape[-1]
    out = torch.empty_like(q_latent)
    if b == 0 or h == 0:
        return out
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    max_seq_len = max(1, max_seq_len)
    head_blocks = triton.cdiv(h, block_h)
    tiles = triton.cdiv(max_seq_len, block_n)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q_latent.device).multi_processor_count if q_latent.is_cuda else 4
        num_splits = max(1, min(tiles, triton.cdiv(2 * sms, b * head_blocks), MAX_SPLITS))
    num_splits = max(1, min(num_splits, tiles, MAX_SPLITS))
    chunk = triton.cdiv(tiles, num_splits) * block_n
    num_splits = triton.cdiv(max_seq_len, chunk)
    o_part = torch.empty(b, h, num_splits, r, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q_latent.device)
    block_r = max(16, triton.next_power_of_2(r))
    block_dr = max(16, triton.next_power_of_2(dr))
    _split_kernel[(b, head_blocks, num_splits)](
        q_latent, q_pe, kv_pages, block_table, seq_lens, o_part, lse, float(softmax_scale),
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        h, r, dr, kv_pages.shape[1], kv_pages.shape[2], chunk,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_DR=block_dr,
        PRECISION=dot_precision(q_latent.dtype),
    )
    _reduce_kernel[(b, h)](
        o_part, lse, out, num_splits, r, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), BLOCK_R=block_r,
        BLOCK_S=triton.next_power_of_2(num_splits),
    )
    return out
