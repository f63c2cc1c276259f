"""FP8 (float8_e4m3fn) 128x128 block weight quantization, the layout of DeepSeek-V3's HF checkpoints.

A weight W [out, in] is stored as `weight` (e4m3) plus `weight_scale_inv` (fp32)
[ceil(out/128), ceil(in/128)];
W = weight * scale_inv broadcast over each 128x128 block.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def block_dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize a block-quantized 2-D weight; raises if the scale grid does not cover the weight."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(
            f"block dequantize needs 2-D weight and scale, got {tuple(weight.shape)}, "
            f"{tuple(scale_inv.shape)}"
        )
    out, inp = weight.shape
    need = (-(-out // block), -(-inp // block))
    if tuple(scale_inv.shape) != need:
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {(out, inp)} "
            f"with {block}x{block} blocks (expected {need})"
        )
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return (weight.float() * s).to(dtype)


def block_quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (e4m3 weight, fp32 scale_inv) with one scale per 128x128 block (amax/448)."""
    out, inp = weight.shape
    bo, bi = -(-out // block), -(-inp // block)
    padded = weight.new_zeros(bo * block, bi * block, dtype=torch.float32)
    padded[:out, :inp] = weight.float()
    blocks = padded.view(bo, block, bi, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(bo * block, bi * block)[:out, :inp].contiguous(), scale_inv
