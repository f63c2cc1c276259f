"""Tiny random Hugging Face DeepseekV3/V2 models for parity tests (transformers is the oracle).

    path, hf = make_hf_model(tmp_path, "deepseek_v3", q_lora_rank=None, seed=1)
    ref = hf_logits(hf, input_ids)

`make_hf_model` builds the model with transformers, randomizes what HF's init leaves trivial (norm gains,
`e_score_correction_bias`) so every parameter matters, and `save_pretrained`s it sharded (several files plus
`model.safetensors.index.json`). Routing is group-limited with topk_group < n_group, so groups really are
excluded. Pass config overrides as keyword arguments.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# what the tiny V3 and V2 share, then each one's own fields
_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
             topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=12, max_position_embeddings=256, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
V3_TINY: dict[str, Any] = _TINY | dict(n_shared_experts=1, q_lora_rank=24, routed_scaling_factor=2.5,
                                       norm_topk_prob=True, num_nextn_predict_layers=1)
V2_TINY: dict[str, Any] = _TINY | dict(n_shared_experts=2, topk_method="group_limited_greedy", q_lora_rank=None,
                                       routed_scaling_factor=1.5)

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def hf_config(model_type: str = "deepseek_v3", **overrides: Any):
    """A transformers DeepseekV3Config / DeepseekV2Config from the tiny defaults plus overrides."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    base = dict(V3_TINY if model_type == "deepseek_v3" else V2_TINY)
    base.update(overrides)
    cls = DeepseekV3Config if model_type == "deepseek_v3" else DeepseekV2Config
    return cls(**base)


def build_hf_model(model_type: str = "deepseek_v3", seed: int = 0, **overrides: Any):
    """A random transformers model (eval mode, fp32, eager attention), every parameter non-trivial."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    cfg = hf_config(model_type, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = DeepseekV3ForCausalLM if model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # logits of order 1-10, not 0.1
            elif "experts" in name or name.endswith("mlp.gate.weight"):
                # HF inits experts/router with std 0.02; give them weight so routing and experts matter.
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model


def make_hf_model(
    directory: str | os.PathLike,
    model_type: str = "deepseek_v3",
    seed: int = 0,
    max_shard_size: str = "40KB",
    **overrides: Any,
):
    """Build a random HF model and save it sharded into `directory`; returns (path, model)."""
    model = build_hf_model(model_type, seed, **overrides)
    path = os.fspath(directory)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path, model


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits [B,T,V] (fp32) for `input_ids` (no padding, positions 0..T-1)."""
    return model(input_ids=input_ids, use_cache=False).logits.float()


def random_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
