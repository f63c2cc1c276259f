"""FP8 128x128 block quantization: round trip error bound and shape checks."""

from __future__ import annotations

import pytest
import torch

from ops.fp8 import block_dequantize, block_quantize
from ops.norm import rms_norm


def test_block_round_trip_and_layout():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    w[:128, :128] *= 100  # one block with a much larger range: per-block scales keep the others precise
    q, s = block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (3, 2)
    back = block_dequantize(q, s)
    rel = (back - w).abs() / w.abs().clamp(min=1e-3)
    assert rel[128:, 128:].median() < 0.05 and (back - w)[128:, 128:].abs().max() < 0.2
    assert not torch.equal(back, w)


def test_bad_scale_shape_named():
    q, s = block_quantize(torch.randn(130, 10))
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        block_dequantize(q, s[:1])


def test_rms_norm_fp32_statistics():
    x = torch.randn(4, 32) * 1e3
    y = rms_norm(x.bfloat16(), torch.ones(32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float().pow(2).mean(-1), torch.ones(4), atol=0.05)
