"""RMSNorm, computed in float32 and cast back, as DeepSeek and transformers do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`weight * x / rms(x)`; the statistics are taken in fp32 so bf16 activations do not lose the scale."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's fused op: the same arithmetic (x * rsqrt(mean(x^2) + eps) * weight) in one pass over x
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel gain (`weight`, the HF checkpoint name)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ops.kernels import rms_norm as selected  # the fused Triton kernel on CUDA, this file's op elsewhere

        return selected(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
