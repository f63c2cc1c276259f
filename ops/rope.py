"""Rotary position embedding with DeepSeek's YaRN scaling.

Two layouts exist for the rotated pairs: *interleaved* `(x0,x1),(x2,x3),...` (DeepSeek's own checkpoints,
`rope_interleave=True`, the default for V2/V3) and *half-split* `(x_i, x_{i+d/2})` (`rope_interleave=False`).
The interleaved form is returned de-interleaved (evens' results, then odds'), exactly as transformers does;
since q and k are permuted the same way, q.k is unchanged and a latent cache can store either.

YaRN (arXiv 2309.00071) blends interpolated and extrapolated frequencies along a linear ramp between the
correction dims of `beta_fast`/`beta_slow`, and multiplies cos/sin by `attention_factor`
(`mscale(factor, mscale) / mscale(factor, mscale_all_dim)`); DeepSeek also multiplies the softmax scale by
`mscale(factor, mscale_all_dim)**2` (see `softmax_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings, from either HF spelling (`rope_scaling`+`rope_theta` or `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction `0.1 * mscale * ln(scale) + 1` (1 when not scaling up)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(
    spec: RopeSpec, dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32, CPU) and the cos/sin multiplier, as transformers computes them."""
    base = float(spec.theta)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / dim
    pos_freqs = base**exponents
    if spec.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if spec.rope_type != "yarn":
        raise ValueError(f"rope type {spec.rope_type!r} is not supported (supported: default, yarn)")
    orig = spec.original_max_position_embeddings or max_position_embeddings
    factor = spec.factor if spec.factor is not None else max_position_embeddings / orig
    attention_factor = spec.attention_factor
    if attention_factor is None:
        if spec.mscale and spec.mscale_all_dim:
            attention_factor = float(
                yarn_mscale(factor, spec.mscale) / yarn_mscale(factor, spec.mscale_all_dim)
            )
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale(spec: RopeSpec, qk_head_dim: int) -> float:
    """Attention softmax scale: `qk_head_dim**-0.5`, times `mscale(factor, mscale_all_dim)**2` under YaRN."""
    scale = qk_head_dim**-0.5
    if spec.rope_type != "default" and spec.mscale_all_dim:
        m = yarn_mscale(spec.factor if spec.factor is not None else 1.0, spec.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, dim/2] for integer `positions`, scaled by the attention factor."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of `x` [..., T, (heads,) dim]; cos/sin broadcast against x[..., :dim/2].

    Callers pass cos/sin already shaped to broadcast (e.g. [B, T, 1, dim/2] for x [B, T, H, dim]).
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
