"""Built-in models and a deterministic initialization from a seed that draws only what a rank holds.

`builtin:tiny` is the small model of the demo and the tests; `builtin:deepseek-v3` is DeepSeek-V3's
published configuration (671B parameters) with seeded weights: for construction on the meta device and
dry runs (`moerun dryrun`), never for materialising the whole model on one machine.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.fake import is_fake
from parallel.shard import full_shape, shard_marks
from runtime.model.config import ModelConfig, builtin_tiny_config

# DeepSeek-V3's HF config.json (deepseek-ai/DeepSeek-V3), the fields the model reads.
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "attention_bias": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}

BUILTINS = {"tiny": builtin_tiny_config,
            "deepseek-v3": lambda: ModelConfig.from_hf_dict(DEEPSEEK_V3, "builtin:deepseek-v3")}


def builtin_config(name: str) -> ModelConfig:
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        raise ValueError(
            f"unknown builtin model {name!r} (known: {', '.join('builtin:' + k for k in BUILTINS)})"
        )
    return BUILTINS[key]()


def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic init, independent of construction order and of any parallel layout, that draws only
    what this rank holds: each row of a weight (row r of expert e for stacked experts) comes from its own
    generator seeded by (seed, tensor name, e, r), so a rank holding some rows (a TP row split, its
    experts, a vocabulary shard) draws just those, and a rank holding a column split of a row (row-parallel
    TP) draws that one row and keeps its columns. No full tensor of a sharded weight is ever made. Norm
    gains are 1, biases and the router correction bias 0, everything else N(0, std). Fake tensors (a dry
    run) hold no values and are left alone."""
    marks = shard_marks(model)
    g = torch.Generator()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if is_fake(t) or t.numel() == 0:
                continue
            if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                t.zero_()
            elif "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
                t.fill_(1.0)
            else:
                _init_rows(t, marks.get(name, {}), _name_seed(seed, name), g, std)


def _init_rows(t: torch.Tensor, info: dict, base: int, g: torch.Generator, std: float) -> None:
    """Fill the local shard `t` row by row from per-row streams of the full tensor (see init_weights)."""
    full = full_shape(t.shape, info)
    if t.dim() == 1:
        g.manual_seed(base)
        t.copy_(torch.randn(full, generator=g)[_cols(info, 0, full[0])] * std)
        return
    tp_dim = info.get("tp_dim")
    expert0 = info.get("ep_offset", 0)
    experts = t.shape[0] if t.dim() == 3 else 1
    rows = t.shape[-2]
    row0 = info["tp_rank"] * rows if tp_dim == t.dim() - 2 else 0
    cols = _cols(info, t.dim() - 1, full[-1])
    view = t.reshape(experts, rows, t.shape[-1])
    for e in range(experts):
        for r in range(rows):
            g.manual_seed(_mix(base, expert0 + e if t.dim() == 3 else 0, row0 + r))
            view[e, r].copy_(torch.randn(full[-1], generator=g)[cols] * std)


def _cols(info: dict, dim: int, width: int) -> slice:
    """The columns of a full row this rank keeps (all, unless TP splits dimension `dim`)."""
    if info.get("tp_dim") != dim:
        return slice(None)
    n = width // info["tp_size"]
    return slice(info["tp_rank"] * n, (info["tp_rank"] + 1) * n)


def _mix(base: int, expert: int, row: int) -> int:
    """A 63-bit seed for (tensor, expert, row): splitmix64 steps over the three."""
    h = base
    for v in (expert, row):
        h = (h ^ (v + 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _name_seed(seed: int, name: str) -> int:
    h = seed & 0xFFFFFFFF
    for ch in name.encode():
        h = (h * 1000003 + ch) & 0x7FFFFFFFFFFFFFFF
    return h
