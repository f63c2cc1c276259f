"""Training-side behaviour of the model: loss parts, MTP, balance loss, gradients, phases, builtin:tiny."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import random_ids

import runtime
from runtime.model.deepseek import MoE


def test_builtin_tiny_shape_and_determinism(tiny):
    cfg = tiny.config
    assert cfg.model_type == "deepseek_v3" and cfg.first_k_dense_replace == 1 and 8 <= cfg.n_routed_experts <= 16
    assert cfg.topk_group < cfg.n_group and len(tiny.mtp) == 1 and cfg.vocab_size >= 256
    assert not tiny.model.layers[0].is_moe and all(layer.is_moe for layer in tiny.model.layers[1:])
    again = runtime.load_model("builtin:tiny")
    other = runtime.load_model("builtin:tiny", seed=1)
    for (n, a), (_, b), (_, c) in zip(tiny.named_parameters(), again.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
        if "norm" not in n:
            assert not torch.equal(a, c), n


def test_forward_loss_parts(tiny):
    ids = random_ids(2, 16, tiny.config.vocab_size, 3)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    with torch.no_grad():
        logits = tiny(ids)
        loss, parts = tiny(ids, labels)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(parts["ce"], ce, atol=1e-6)
    # MTP at position t predicts labels[t+1] from the main hidden state at t and the embedding of ids[t+1].
    with torch.no_grad():
        h = tiny.hidden_states(ids)
        mtp_logits = tiny.mtp_logits(tiny.mtp_hidden(h, ids))
    mtp_ce = F.cross_entropy(mtp_logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(parts["mtp"], mtp_ce, atol=1e-6)
    assert torch.allclose(loss, ce + tiny.mtp_loss_coef * mtp_ce, atol=1e-6)
    assert "aux" not in parts


def test_backward_reaches_every_parameter_and_balance_loss():
    model = runtime.load_model("builtin:tiny", seed=2).train()
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate.aux_loss_coef = 1e-3
    ids = random_ids(4, 24, model.config.vocab_size, 4)
    loss, parts = model(ids, torch.roll(ids, -1, 1))
    assert parts["aux"] > 0
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    # Expert load is recorded for the aux-loss-free bias update: k choices per token.
    moe = model.model.layers[1].mlp
    assert int(moe.gate.last_load.sum()) == 4 * 24 * model.config.num_experts_per_tok


@torch.no_grad()
def test_phases_compose_to_forward(tiny):
    layer = tiny.model.layers[2]
    h = torch.randn(2, 6, tiny.config.hidden_size)
    cos, sin = tiny.rotary(torch.arange(6), h.dtype)
    h1, x = layer.attention_phase(h, cos, sin)
    w, idx = layer.gate_phase(x)
    recv, handle = layer.dispatcher.dispatch(x.reshape(-1, x.shape[-1]), idx, w)
    assert recv.shape[0] == 12 * tiny.config.num_experts_per_tok
    assert torch.all(handle.tokens_per_expert >= 0) and int(handle.tokens_per_expert.sum()) == recv.shape[0]
    y = layer.expert_phase(recv, handle.tokens_per_expert, handle.recv_weights)
    out = layer.finish_phase(h1, layer.dispatcher.combine(y, handle), layer.shared_phase(x))
    assert torch.allclose(out, layer(h, cos, sin), atol=1e-6)


@torch.no_grad()
def test_grouped_experts_match_per_token_reference(tiny):
    """The grouped path equals a plain per-token loop over the chosen experts."""
    moe = tiny.model.layers[1].mlp
    x = torch.randn(10, tiny.config.hidden_size)
    w, idx = moe.gate(x[None])
    recv, handle = moe.dispatcher.dispatch(x, idx, w)
    got = moe.dispatcher.combine(moe.experts(recv, handle.tokens_per_expert, handle.recv_weights), handle)
    ex = moe.experts
    ref = torch.zeros_like(x)
    for n in range(10):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            hmid = F.silu(x[n] @ ex.gate_proj[e].T) * (x[n] @ ex.up_proj[e].T)
            ref[n] += w[n, j] * (hmid @ ex.down_proj[e].T)
    assert torch.allclose(got, ref, atol=1e-5)


def test_bad_input_ids(tiny):
    with pytest.raises(ValueError, match="out of range"):
        tiny.logits(torch.tensor([[0, tiny.config.vocab_size]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tiny.logits(torch.tensor([1, 2]))


def test_router_bias_stays_fp32_through_to_bfloat16():
    m = runtime.load_model("builtin:tiny")
    gate = m.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, gate.e_score_correction_bias.numel()) / 3)
    before = gate.e_score_correction_bias.clone()
    m.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, before)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in m.state_dict()


def test_bfloat16_load_runs():
    m = runtime.load_model("builtin:tiny", dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    out = m.logits(random_ids(1, 5, m.config.vocab_size, 0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_import_runtime_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, runtime; assert callable(runtime.load_model); assert 'torch' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent)
    )
