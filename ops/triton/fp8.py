"""FP8 (float8_e4m3fn) quantization and the blockwise-scaled FP8 x FP8 GEMM, twins of the torch ops in
`ops.fp8_train` (activations, 1x128 groups) and `ops.fp8` (weights, 128x128 blocks).

Scales are DeepSeek-V3's: scale = amax / 448 per group (floored at 1e-12), stored as fp32 "scale_inv" so
that value = q * scale. The GEMM keeps BLOCK_K = 128 equal to the quantization group, so each K step is one
FP8 tensor-core product accumulated in fp32 and then rescaled by a_scale[m, kb] * b_scale[n // 128, kb]
(DeepSeek's promotion of partial sums to fp32 with per-block scaling, done per 128-wide K block here).

Under TRITON_INTERPRET=1 the interpreter's own fp32->fp8 cast mis-rounds values whose rounding carries into
the next binade, so the quantize kernels round in software (`round_to_e4m3`, exact RNE) before the cast;
the stored tensors are real float8_e4m3fn in both modes. On CUDA the hardware cast (cvt.rn.satfinite) is
used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.common import check_device, interpreting, round_to_e4m3

E4M3_MAX = 448.0
GROUP = 128


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, s_xm, s_qm, s_sm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SOFT_ROUND: tl.constexpr,
):
    """One program quantizes one BLOCK_M x BLOCK_K group with one scale (1x128: BLOCK_M = 1)."""
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12)
    scale = amax / 448.0
    y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    if SOFT_ROUND:
        y = round_to_e4m3(y)
    tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * s_qm + offs_k[None, :], y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + pm * s_sm + pk, scale)


def _quantize(x: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(x)
    if x.dim() != 2:
        raise ValueError(f"fp8 quantize needs a 2-D tensor, got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, GROUP))
    s = torch.empty(grid, dtype=torch.float32, device=x.device)
    if m and k:
        _quant_kernel[grid](
            x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
            BLOCK_M=block_m, BLOCK_K=GROUP, SOFT_ROUND=interpreting(),
        )
    return q, s


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (q float8_e4m3fn [M, K], scale fp32 [M, cdiv(K, 128)]): one scale per 1x128."""
    return _quantize(x, 1)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] -> (q float8_e4m3fn [N, K], scale fp32 [cdiv(N,128), cdiv(K,128)]): one per 128x128."""
    return _quantize(w, GROUP)


@triton.jit
def _gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
    s_am, s_asm, s_bn, s_bsn, s_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm = offs_m < M
    mn = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_kb = tl.cdiv(K, BLOCK_K)
    for kb in range(0, n_kb):
        kk = kb * BLOCK_K + offs_k
        mk = kk < K
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * s_am + kk[None, :], mask=mm[:, None] & mk[None, :],
                    other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[None, :] * s_bn + kk[:, None], mask=mk[:, None] & mn[None, :],
                    other=0.0)
        part = tl.dot(a, b, out_dtype=tl.float32)
        sa = tl.load(as_ptr + offs_m * s_asm + kb, mask=mm, other=0.0)
        sb = tl.load(bs_ptr + (offs_n // BLOCK_K) * s_bsn + kb, mask=mn, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def fp8_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """C [M, N] = A @ B.T with A = a_q * a_scale (1x128 groups) and B = b_q * b_scale (128x128 blocks).

    a_q [M, K] and b_q [N, K] are float8_e4m3fn; fp32 accumulation; BLOCK_N must divide 128.
    """
    check_device(a_q, a_scale, b_q, b_scale)
    m, k = a_q.shape
    n = b_q.shape[0]
    kb = triton.cdiv(k, GROUP)
    if b_q.shape[1] != k:
        raise ValueError(f"fp8_gemm: A is [M, {k}] but B is {tuple(b_q.shape)} (want [N, {k}])")
    if a_scale.shape != (m, kb) or b_scale.shape != (triton.cdiv(n, GROUP), kb):
        raise ValueError(
            f"fp8_gemm scales must be [M, cdiv(K,128)] = {(m, kb)} and [cdiv(N,128), cdiv(K,128)] = "
            f"{(triton.cdiv(n, GROUP), kb)}, got {tuple(a_scale.shape)}, {tuple(b_scale.shape)}"
        )
    if a_q.dtype != torch.float8_e4m3fn or b_q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemm wants float8_e4m3fn operands, got {a_q.dtype}, {b_q.dtype}")
    if GROUP % block_n:
        raise ValueError(f"block_n {block_n} must divide the 128-wide weight scale block")
    a_q, b_q = a_q.contiguous(), b_q.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m and n:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _gemm_kernel[grid](
            a_q, a_scale, b_q, b_scale, c, m, n, k,
            a_q.stride(0), a_scale.stride(0), b_q.stride(0), b_scale.stride(0), c.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP,
        )
    return c
