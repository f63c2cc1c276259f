"""Config parsing: DeepSeek's real Hub configs, defaults, validation errors naming the field."""

from __future__ import annotations

import pytest
import torch

from runtime.jobconfig import ConfigError
from runtime.model.config import ModelConfig
from runtime.model.loading import build_model

# DeepSeek-V3's config.json as published on the Hub (rope_scaling + rope_theta spelling, FP8 weights).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_deepseek_v3_hub_config_builds_671b_plus_mtp():
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40 and cfg.rope.interleave
    assert cfg.n_group == 8 and cfg.topk_group == 4 and cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576
    model = build_model(cfg, dtype=torch.bfloat16, materialize=False)  # meta device: no memory
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    # The technical report: 671B parameters in the main model; the release adds 14B for MTP (685B in all).
    # (MTP's embedding and head are shared with the main model here, so they are not counted twice.)
    assert 670.5e9 < main < 671.5e9, main
    assert 11e9 < mtp < 12.5e9, mtp
    attn = model.model.layers[0].self_attn
    assert attn.scale == pytest.approx(192**-0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


def test_defaults_and_v2_rules():
    cfg = ModelConfig.from_hf_dict(
        {
            "model_type": "deepseek_v2",
            "num_experts_per_tok": 6,
            "topk_method": "group_limited_greedy",
            "n_group": 8,
            "topk_group": 3,
            "n_routed_experts": 160,
        }
    )
    assert cfg.scoring_func == "softmax" and cfg.rope.interleave and cfg.q_lora_rank == 1536
    assert cfg.first_k_dense_replace == 0 and cfg.num_nextn_predict_layers == 0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model_type", "mixtral", "model_type"),
        ("hidden_size", 0, "hidden_size"),
        ("q_lora_rank", -1, "q_lora_rank"),
        ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
        ("n_group", 7, "n_group"),
        ("topk_group", 9, "topk_group"),
        ("num_experts_per_tok", 300, "num_experts_per_tok"),
        ("moe_layer_freq", 2, "moe_layer_freq"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope"),
        ("rope_scaling", {"type": "yarn", "factor": -1}, "factor"),
    ],
)
def test_bad_fields_are_named(field, value, match):
    raw = dict(DEEPSEEK_V3, **{field: value})
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(raw, source="x/config.json")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(str(tmp_path))
