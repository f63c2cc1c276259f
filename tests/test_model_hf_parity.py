"""The model against transformers' DeepseekV3/V2 on tiny random checkpoints saved sharded (the oracle)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hf_models import YARN, hf_logits, make_hf_model, random_ids

import runtime

pytest.importorskip("transformers")

CASES = {
    # name: (model_type, overrides)
    "v3": ("deepseek_v3", {}),
    "v3_no_q_lora_yarn": ("deepseek_v3", {"q_lora_rank": None, "rope_parameters": YARN}),
    "v3_half_split_rope": ("deepseek_v3", {"rope_interleave": False, "norm_topk_prob": False}),
    "v2_group_limited": ("deepseek_v2", {}),
    "v2_greedy_yarn_q_lora": (
        "deepseek_v2",
        {"topk_method": "greedy", "q_lora_rank": 24, "rope_parameters": YARN, "first_k_dense_replace": 0},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    path, hf = make_hf_model(tmp_path_factory.mktemp(request.param), model_type, seed=3, **overrides)
    return path, hf, runtime.load_model(path)


def test_checkpoint_is_sharded(pair):
    path, _, _ = pair
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1


def test_logits_match_transformers(pair):
    _, hf, model = pair
    vocab = hf.config.vocab_size
    for seed, (b, t) in enumerate([(3, 17), (2, 40), (4, 1)]):
        ids = random_ids(b, t, vocab, seed)
        ours = model.logits(ids)
        ref = hf_logits(hf, ids)
        assert ours.shape == ref.shape == (b, t, vocab) and ours.dtype == torch.float32
        assert ref.abs().max() > 1.0  # logits big enough for the tolerance to mean something
        assert (ours - ref).abs().max().item() < 1e-4


def test_groups_really_excluded(pair):
    """Group-limited routing changes the choice for some tokens (else the test above would not cover it)."""
    _, hf, model = pair
    cfg = model.config
    if cfg.topk_method == "greedy":
        pytest.skip("greedy routing has no groups")
    from ops.moe import route

    moe = next(m.mlp for m in model.model.layers if m.is_moe)
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    logits = torch.nn.functional.linear(x.float(), moe.gate.weight.float())
    kw = dict(
        top_k=cfg.num_experts_per_tok,
        scoring=cfg.scoring_func,
        topk_method=cfg.topk_method,
        bias=moe.gate.e_score_correction_bias,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=1.0,
    )
    _, idx_limited, _ = route(logits, n_group=cfg.n_group, topk_group=cfg.topk_group, **kw)
    _, idx_free, _ = route(logits, n_group=cfg.n_group, topk_group=cfg.n_group, **kw)
    assert cfg.topk_group < cfg.n_group
    changed = (idx_limited.sort(-1).values != idx_free.sort(-1).values).any(-1)
    assert changed.any()


def test_deepseek_hub_rope_spelling(tmp_path):
    """DeepSeek's Hub configs write rope_scaling + rope_theta (no rope_interleave); they load the same."""
    path, hf = make_hf_model(tmp_path, "deepseek_v3", seed=5, rope_parameters=YARN)
    cfg_path = os.path.join(path, "config.json")
    raw = json.load(open(cfg_path))
    rp = raw.pop("rope_parameters")
    raw.pop("rope_interleave")
    raw["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    raw["rope_scaling"] = rp
    raw["topk_method"], raw["scoring_func"] = "noaux_tc", "sigmoid"
    json.dump(raw, open(cfg_path, "w"))
    model = runtime.load_model(path)
    assert model.config.rope.rope_type == "yarn" and model.config.rope.interleave
    ids = random_ids(2, 20, raw["vocab_size"], 1)
    assert (model.logits(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-4
