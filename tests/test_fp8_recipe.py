"""FP8 recipe (ops.fp8_train): 1x128 / 128x128 scales exactly as specified, the e4m3 round-trip bound per
block, the three GEMMs' quantization groups, in-place model conversion, and a short fp32-vs-FP8 training run.
"""

from __future__ import annotations

import pytest
import torch

from ops.fp8 import E4M3_MAX, block_dequantize, block_quantize
from ops.fp8_train import (
    Fp8GroupedExpertsMixin,
    Fp8Linear,
    convert_to_fp8_training,
    dequantize_1x128,
    fake_quant_act,
    fake_quant_weight,
    fp8_linear,
    quantize_1x128,
)

# float8_e4m3fn: 3 mantissa bits -> round-to-nearest relative error <= 2^-4 for normal values; below the
# smallest normal (2^-6, in units of the scale) the spacing is 2^-9, so the absolute error is <= 2^-10.
REL, SUB_ABS = 2.0**-4, 2.0**-10


def _bound(x: torch.Tensor, scale_per_elem: torch.Tensor) -> torch.Tensor:
    return torch.maximum(x.abs() * REL, scale_per_elem * SUB_ABS)


def _spread(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1])  # groups of varied magnitude


def test_activation_scales_are_per_1x128_group():
    x = _spread((6, 300))
    q, s = quantize_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (6, 3) and s.dtype == torch.float32  # cdiv(300, 128) groups per row
    for m in range(6):
        for g in range(3):
            grp = x[m, g * 128 : (g + 1) * 128]
            assert s[m, g] == grp.abs().max() / E4M3_MAX  # amax / 448, exactly
            j = grp.abs().argmax()
            assert abs(float(q[m, g * 128 + j].float())) == E4M3_MAX  # the group's largest maps to 448
    with pytest.raises(ValueError, match="1x128"):
        dequantize_1x128(q, s[:, :2])


def test_weight_scales_are_per_128x128_block():
    w = _spread((200, 300), seed=1).T.contiguous()[:260]  # [260, 200]: ragged blocks in both dims
    q, s = block_quantize(w)
    assert s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert s[i, j] == blk.abs().max() / E4M3_MAX


@pytest.mark.parametrize("kind", ["act", "weight"])
def test_roundtrip_within_e4m3_bound_per_block(kind):
    x = _spread((260, 300), seed=2)
    if kind == "act":
        q, s = quantize_1x128(x)
        back = dequantize_1x128(q, s)
        per_elem = s.repeat_interleave(128, 1)[:, :300]
    else:
        q, s = block_quantize(x)
        back = block_dequantize(q, s)
        per_elem = s.repeat_interleave(128, 0)[:260].repeat_interleave(128, 1)[:, :300]
    err = (back - x).abs()
    ratio = err / _bound(x, per_elem)
    assert float(ratio.max()) <= 1.0 + 1e-6
    assert float(ratio.max()) > 0.9  # the bound is tight: real rounding happened
    torch.testing.assert_close(back.abs().amax(), x.abs().amax(), rtol=0, atol=0)  # amax is exact


def _grouped_fake_quant_cols(t: torch.Tensor) -> torch.Tensor:
    """Independent 128x1 fake quantization: one scale per 128 consecutive rows of each column."""
    out = torch.empty_like(t)
    for r0 in range(0, t.shape[0], 128):
        blk = t[r0 : r0 + 128]
        scale = blk.abs().amax(0).clamp(min=1e-12) / E4M3_MAX
        out[r0 : r0 + 128] = (blk / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return out


def test_fp8_linear_gemms_use_the_recipe_groups():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 96, generator=g) * torch.linspace(0.01, 3, 200)[:, None]).requires_grad_()
    w = (torch.randn(150, 96, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(200, 150, generator=g)
    y = fp8_linear(x, w)
    y.backward(dy)
    wq = fake_quant_weight(w.detach())
    torch.testing.assert_close(y, fake_quant_act(x.detach()) @ wq.T)  # fprop: x 1x128, W 128x128
    torch.testing.assert_close(x.grad, fake_quant_act(dy) @ wq)  # dgrad: dy 1x128 along N
    dw = _grouped_fake_quant_cols(dy).T @ _grouped_fake_quant_cols(x.detach())  # wgrad: 128x1 over tokens
    torch.testing.assert_close(w.grad, dw)
    # FP8, not a no-op: differs from fp32, but only by e4m3-sized amounts.
    exact = dy.T @ x.detach()
    rel = float((w.grad - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.1


def test_convert_tiny_model_in_place():
    from runtime import load_model

    ref = load_model("builtin:tiny").train()
    model = load_model("builtin:tiny").train()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    names = convert_to_fp8_training(model)
    assert "lm_head" not in names and "model.layers.0.self_attn.q_a_proj" in names
    assert "model.layers.1.mlp.experts" in names
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, Fp8GroupedExpertsMixin) and type(experts).__mro__[2].__name__ == "GroupedExperts"
    assert isinstance(model.model.layers[0].mlp.gate_proj, Fp8Linear)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same tensors, same names
    assert convert_to_fp8_training(model) == names  # idempotent
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    loss8, _ = model(ids[:, :-1], labels=ids[:, 1:])
    loss32, _ = ref(ids[:, :-1], labels=ids[:, 1:])
    l8, l32 = float(loss8.detach()), float(loss32.detach())
    assert l8 != l32 and abs(l8 - l32) < 0.01 * l32
    loss8.backward()
    assert experts.gate_proj.grad is not None and experts.gate_proj.grad.abs().sum() > 0


@pytest.mark.timeout(240)
def test_short_fp8_training_tracks_fp32():
    """CI's short version of bench/fp8_accuracy.py: same init and batches, final-loss gap under 1%."""
    from bench.fp8_accuracy import compare

    r = compare(steps=20, batch=4, seq_len=32)
    assert r["fp32_final"] < r["first_loss"] - 0.5  # it trained
    assert r["gap_final"] < 0.01, r
