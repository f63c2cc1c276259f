"""Fused RMSNorm (optionally with the residual add before it), twin of `ops.norm.rms_norm`.

One program per row: load the row once, take the mean square in fp32, scale, cast to the input dtype, and
multiply by the gain, the same order of roundings as the torch op (so fp32 matches to ~1 ulp). With a
residual, `s = x + residual` is written out as well and normalised, saving one read of s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.common import check_device


@triton.jit
def _rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / n_cols
    xn = (xf * (1.0 / tl.sqrt(ms + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * xn.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * x / rms(x)` over the last dim. With `residual`: returns (rms_norm(x + residual), x + residual).

    Output dtype follows torch promotion of (weight, x), as `ops.norm.rms_norm` does.
    """
    check_device(x, weight)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm weight must be [{n}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = residual.reshape(-1, n).contiguous().to(x.dtype)
        s = torch.empty_like(x2)
    else:
        r2, s = x2, x2
    if rows:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows,)](
            x2, r2, weight, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    y = y.view(*x.shape[:-1], n)
    if residual is not None:
        return y, s.view_as(x)
    return y
