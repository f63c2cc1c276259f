"""Rotary/YaRN against transformers' own functions, and the rotation's defining property."""

from __future__ import annotations

import pytest
import torch

from ops.rope import RopeSpec, apply_rope, inv_freq_and_attention_factor, rope_cos_sin, softmax_scale

tf = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "params",
    [
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    ],
)
def test_yarn_matches_transformers(params):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    cfg = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=dict(params))
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    p = dict(params)
    spec = RopeSpec(
        theta=p["rope_theta"],
        rope_type="yarn",
        factor=p["factor"],
        original_max_position_embeddings=p["original_max_position_embeddings"],
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
    )
    inv, factor = inv_freq_and_attention_factor(spec, 64, 163840)
    assert torch.allclose(inv, ref_inv, rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)
    assert softmax_scale(spec, 192) == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 192**-0.5))
    if p.get("mscale_all_dim"):
        assert softmax_scale(spec, 192) > 192**-0.5  # the correction is really applied


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_matches_transformers(interleave):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 1, 7, 16, generator=g)  # [B, H, T, D]
    inv, _ = inv_freq_and_attention_factor(RopeSpec(), 16, 4096)
    cos, sin = rope_cos_sin(inv, 1.0, torch.arange(7), torch.float32)
    hf = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    rq, rk = hf(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
    assert torch.allclose(apply_rope(q, cos, sin, interleave), rq, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin, interleave), rk, atol=1e-6)


def test_rotation_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    inv, _ = inv_freq_and_attention_factor(RopeSpec(), 16, 4096)

    def dot(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(inv, 1.0, torch.tensor(pq), torch.float32)
        ck, sk = rope_cos_sin(inv, 1.0, torch.tensor(pk), torch.float32)
        return float(apply_rope(q, cq, sq, True) @ apply_rope(k, ck, sk, True))

    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)
