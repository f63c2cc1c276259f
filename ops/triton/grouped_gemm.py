"""Grouped GEMM for routed experts over rows sorted by expert, twin of `ops.moe.grouped_linear` /
`grouped_swiglu`.

The rows of expert e are x[offs[e] : offs[e] + counts[e]]. Work is cut into BLOCK_M-row tiles that never
cross an expert boundary; the tile -> (expert, first row) map is built on the device with no host sync,
sized by the upper bound cdiv(M, BLOCK_M) + E (spare tiles do no work), so empty experts cost nothing and
the launch is CUDA-graph friendly. Grid: (tiles, cdiv(N, BLOCK_N)). K need not be a multiple of BLOCK_K.

`grouped_swiglu` fuses the gate and up projections into one kernel (one read of each x tile feeds both
accumulators, and silu(g) * u is applied before the single write), then runs the down projection as a plain
grouped GEMM: this saves writing and re-reading the two [M, I] intermediates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.common import check_device, dot_precision


@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, u_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, N, K,
    s_xm, s_we, s_wn, s_ym,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    row0 = tl.load(tile_row_ptr + t)
    row_end = tl.load(tile_end_ptr + t)
    valid = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    k_limit = tl.where(valid, K, 0)  # spare tiles skip the K loop

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm = offs_m < row_end  # spare tiles have row_end 0
    mn = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    w_cols = e * s_we + offs_n.to(tl.int64)[None, :] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if SWIGLU:
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_limit, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        a = tl.load(x_rows + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_ptr + w_cols + kk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        acc += tl.dot(a, wt, input_precision=PRECISION)
        if SWIGLU:
            ut = tl.load(u_ptr + w_cols + kk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
            acc_u += tl.dot(a, ut, input_precision=PRECISION)
    if SWIGLU:
        # Round the two projections to the output dtype first, as the unfused torch path does.
        g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def tile_schedule(
    tokens_per_expert: torch.Tensor, num_rows: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_expert, tile_first_row, tile_row_end) int32 [cdiv(M, BLOCK_M) + E]; spare tiles have expert -1.

    Computed with device ops only (no .item()), so the grid size depends on M and E alone.
    """
    dev = tokens_per_expert.device
    counts = tokens_per_expert.to(torch.int64)
    e = counts.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(num_rows, block_m) + e
    t = torch.arange(n_tiles, device=dev)
    ex = torch.searchsorted(cum, t, right=True)
    valid = ex < e
    ec = ex.clamp(max=e - 1)
    first = starts[ec] + (t - (cum[ec] - tiles[ec])) * block_m
    end = starts[ec] + counts[ec]
    return (
        torch.where(valid, ec, -1).to(torch.int32),
        torch.where(valid, first, 0).to(torch.int32),
        torch.where(valid, end, 0).to(torch.int32),
    )


def _check(x: torch.Tensor, weights: list[torch.Tensor], tokens_per_expert: torch.Tensor) -> None:
    check_device(x, tokens_per_expert, *weights)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K] sorted by expert, got {tuple(x.shape)}")
    for w in weights:
        if w.dim() != 3 or w.shape[2] != x.shape[1]:
            raise ValueError(f"expert weight must be [E, N, K={x.shape[1]}], got {tuple(w.shape)}")
        if w.shape != weights[0].shape:
            raise ValueError(f"gate/up weights differ in shape: {tuple(w.shape)} vs {tuple(weights[0].shape)}")
    if tokens_per_expert.shape != (weights[0].shape[0],):
        raise ValueError(
            f"tokens_per_expert must be [E={weights[0].shape[0]}], got {tuple(tokens_per_expert.shape)}"
        )


def _launch(x, w, u, tokens_per_expert, block_m, block_n, block_k):
    m, k = x.shape
    n = w.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 and w.stride(0) == w.stride(1) * w.shape[1] else w.contiguous()
    u = w if u is None else (u if u.stride() == w.stride() else u.contiguous())
    te, tr, tend = tile_schedule(tokens_per_expert.to(x.device), m, block_m)
    grid = (te.shape[0], triton.cdiv(n, block_n))
    _grouped_kernel[grid](
        x, w, u, y, te, tr, tend, n, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
        SWIGLU=u is not w, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype),
    )
    return y


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
    block_m: int = 64, block_n: int = 64, block_k: int = 32,
) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e].T; x [M, K] sorted by expert, weight [E, N, K]."""
    _check(x, [weight], tokens_per_expert)
    return _launch(x, weight, None, tokens_per_expert, block_m, block_n, block_k)


def grouped_swiglu(
    x: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    block_m: int = 64, block_n: int = 64, block_k: int = 32,
) -> torch.Tensor:
    """down(silu(gate x) * up x) per expert; gate/up fused in one kernel. Weights [E, out, in]."""
    _check(x, [gate_proj, up_proj], tokens_per_expert)
    _check(x.new_empty(0, gate_proj.shape[1]), [down_proj], tokens_per_expert)
    h = _launch(x, gate_proj, up_proj, tokens_per_expert, block_m, block_n, block_k)
    return _launch(h, down_proj, None, tokens_per_expert, block_m, block_n, block_k)
