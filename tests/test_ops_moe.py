"""Router against transformers' V2/V3 routers; grouped expert GEMM against a per-expert reference."""

from __future__ import annotations

import pytest
import torch

from ops.moe import grouped_linear, grouped_swiglu, route, sort_by_expert

pytest.importorskip("transformers")


def _hf_router(model_type: str, **kw):
    from hf_models import hf_config

    cfg = hf_config(
        model_type, hidden_size=16, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, **kw
    )
    if model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as R
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as R
    r = R(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g))
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.copy_(0.3 * torch.randn(16, generator=g))
    return cfg, r


def _canon(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx.argsort(-1)
    return w.gather(-1, order), idx.gather(-1, order)


@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("deepseek_v3", {"norm_topk_prob": True}),
        ("deepseek_v3", {"norm_topk_prob": False}),
        ("deepseek_v2", {"topk_method": "group_limited_greedy"}),
        ("deepseek_v2", {"topk_method": "greedy"}),
    ],
)
def test_route_matches_transformers(model_type, kw):
    cfg, r = _hf_router(model_type, **kw)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    logits, ref_w, ref_idx = r(x)
    method = "noaux_tc" if model_type == "deepseek_v3" else cfg.topk_method
    w, idx, _ = route(
        logits,
        top_k=4,
        scoring="sigmoid" if model_type == "deepseek_v3" else "softmax",
        topk_method=method,
        n_group=4,
        topk_group=2,
        bias=getattr(r, "e_score_correction_bias", None),
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )
    w, idx = _canon(w, idx)
    ref_w, ref_idx = _canon(ref_w, ref_idx)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(w, ref_w, atol=1e-6)
    if method != "greedy":
        groups = (idx // 4).unique(dim=None)
        per_token_groups = [(row // 4).unique().numel() for row in idx]
        assert max(per_token_groups) <= 2 and groups.numel() > 2  # limited per token, all groups used overall


def test_bias_only_selects():
    """The correction bias changes which experts win but never the weights' source (unbiased scores)."""
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    bias = torch.zeros(8)
    bias[3] = 10.0
    kw = dict(
        top_k=2,
        scoring="sigmoid",
        topk_method="noaux_tc",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    w, idx, scores = route(logits, bias=bias, **kw)
    assert (idx == 3).any(-1).all()
    assert torch.allclose(w, logits.sigmoid().gather(1, idx))


@pytest.mark.parametrize("force_loop,dim_in,dim_out", [(False, 8, 4), (True, 8, 4), (False, 6, 5)])
def test_grouped_linear_with_empty_experts_and_grads(force_loop, dim_in, dim_out):
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 5, 0, 1])
    x = torch.randn(int(counts.sum()), dim_in, generator=g, requires_grad=True)
    w = torch.randn(5, dim_out, dim_in, generator=g, requires_grad=True)
    y = grouped_linear(x, w, counts, force_loop=force_loop)
    starts = torch.cumsum(counts, 0) - counts
    ref = torch.cat([x[s : s + c] @ w[e].T for e, (s, c) in enumerate(zip(starts.tolist(), counts.tolist()))])
    assert torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()  # a stride-0 gradient, which grouped_mm's backward alone rejects
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def test_grouped_swiglu_sorted_rows():
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 6, (20, 2), generator=g)
    order, counts = sort_by_expert(idx, 6)
    assert torch.equal(idx.reshape(-1)[order], idx.reshape(-1).sort().values)
    x = torch.randn(40, 8, generator=g)
    gp, up, dp = (
        torch.randn(6, 4, 8, generator=g),
        torch.randn(6, 4, 8, generator=g),
        torch.randn(6, 8, 4, generator=g),
    )
    a = grouped_swiglu(x, gp, up, dp, counts)
    b = grouped_swiglu(x, gp, up, dp, counts, force_loop=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_sequence_balance_loss_is_one_when_balanced_and_larger_when_not():
    from ops.moe import sequence_balance_loss

    e, k, t = 8, 2, 8
    scores = torch.rand(t, e, generator=torch.Generator().manual_seed(5)) + 0.1
    balanced = torch.arange(t * k).view(t, k) % e  # every expert chosen exactly t*k/e times
    assert sequence_balance_loss(scores, balanced, 1, e, k).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.tensor([[0, 1]] * t)
    peaked = scores.clone()
    peaked[:, :2] += 5.0  # the router also prefers experts 0 and 1
    assert sequence_balance_loss(peaked, skewed, 1, e, k).item() > 2.0
