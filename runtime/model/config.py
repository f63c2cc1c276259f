"""Model configuration for the DeepSeek-V2/V3 family, read from an HF `config.json` and validated.

Both rope spellings load: DeepSeek's Hub configs (`rope_scaling` {"type": "yarn", ...} + `rope_theta`, no
`rope_interleave`: interleaved is the default for these models) and transformers 5 (`rope_parameters`).
Fields missing from the file take transformers' defaults for that model_type; bad values are errors that
name the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ops.rope import RopeSpec
from runtime.jobconfig import ConfigError  # the one config error: a job config or a config.json

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


# transformers' class defaults (DeepseekV3Config / DeepseekV2Config), used for fields a file leaves out:
# what the two share, then each one's own values.
_SHARED = dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
               rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
               rope_interleave=True)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": _SHARED | dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, max_position_embeddings=4096, num_nextn_predict_layers=1, bos_token_id=0,
        eos_token_id=1, topk_method="noaux_tc", scoring_func="sigmoid"),
    "deepseek_v2": _SHARED | dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
        num_hidden_layers=32, num_attention_heads=32, n_shared_experts=2, n_routed_experts=64,
        routed_scaling_factor=1.0, n_group=None, topk_group=None, num_experts_per_tok=None,
        first_k_dense_replace=0, norm_topk_prob=False, max_position_embeddings=2048, num_nextn_predict_layers=0,
        bos_token_id=1, eos_token_id=2, topk_method="greedy", scoring_func="softmax"),
}


@dataclass
class ModelConfig:
    """Everything the model needs; names follow the HF config fields."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int | None = 4
    topk_group: int | None = 2
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeSpec = field(default_factory=RopeSpec)
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Dense MLP below first_k_dense_replace, MoE above (MTP is layer num_hidden_layers)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def validate(self) -> ModelConfig:
        def need(cond: bool, fld: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field {fld!r} = {getattr(self, fld, None)!r}: {why}")

        need(
            self.model_type in SUPPORTED_MODEL_TYPES,
            "model_type",
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "qk_nope_head_dim",
        ):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive integer")
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            "q_lora_rank",
            "must be a positive integer or null",
        )
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.n_routed_experts > 0:
            need(
                isinstance(self.num_experts_per_tok, int)
                and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok",
                f"must be in 1..n_routed_experts ({self.n_routed_experts})",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.scoring_func in ("softmax", "sigmoid"), "scoring_func", "supported: softmax, sigmoid")
            need(
                self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
                "topk_method",
                "supported: greedy, group_limited_greedy, noaux_tc",
            )
            if self.topk_method != "greedy":
                g = self.n_group or 1
                need(
                    self.n_routed_experts % g == 0,
                    "n_group",
                    f"must divide n_routed_experts ({self.n_routed_experts})",
                )
                need(
                    self.topk_group is None or 1 <= self.topk_group <= g,
                    "topk_group",
                    f"must be in 1..n_group ({g})",
                )
                if self.topk_method == "noaux_tc":
                    need(
                        self.n_routed_experts // g >= 2 or g == 1,
                        "n_group",
                        "noaux_tc needs >= 2 experts per group",
                    )
                allowed = (self.topk_group or g) * (self.n_routed_experts // g)
                need(
                    self.num_experts_per_tok <= allowed,
                    "num_experts_per_tok",
                    f"exceeds the {allowed} experts in topk_group groups",
                )
        need(
            self.rope.rope_type in ("default", "yarn"),
            "rope_scaling",
            f"rope type {self.rope.rope_type!r} not supported (default, yarn)",
        )
        return self

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed HF config.json (deepseek_v2 / deepseek_v3)."""
        mt = raw.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: config field 'model_type' = {mt!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        d = dict(_DEFAULTS[mt])
        d.update({k: v for k, v in raw.items() if k in d or k in _FIELD_NAMES})
        if mt == "deepseek_v3":
            # transformers' V3 always routes noaux_tc with sigmoid scores, whatever the file says.
            d["topk_method"], d["scoring_func"] = "noaux_tc", "sigmoid"
        else:
            d["rope_interleave"] = True  # V2 rotates interleaved pairs (complex form); no switch exists.
            if d.get("scoring_func", "softmax") != "softmax":
                raise ConfigError(
                    f"{source}: config field 'scoring_func' = {d['scoring_func']!r}: "
                    "deepseek_v2 supports softmax"
                )
        moe_freq = raw.get("moe_layer_freq", 1)
        if moe_freq != 1:
            raise ConfigError(f"{source}: config field 'moe_layer_freq' = {moe_freq!r}: only 1 is supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: config field 'hidden_act' = {act!r}: only silu is supported")
        if d.get("n_routed_experts") is None:
            d["n_routed_experts"] = 0
        d["rope"] = _rope_from_hf(raw, bool(d.pop("rope_interleave", True)), source)
        kwargs = {k: v for k, v in d.items() if k in _FIELD_NAMES or k == "rope"}
        try:
            cfg = cls(**kwargs)
            return cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str) -> ModelConfig:
        """Read `path` (a config.json, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as an HF config.json dict (transformers 5 spelling), e.g. for writing checkpoints."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        r = self.rope
        rp: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
        if r.rope_type == "yarn":
            rp.update(
                factor=r.factor,
                original_max_position_embeddings=r.original_max_position_embeddings,
                beta_fast=r.beta_fast,
                beta_slow=r.beta_slow,
                mscale=r.mscale,
                mscale_all_dim=r.mscale_all_dim,
            )
        d.update(
            rope_parameters=rp,
            rope_interleave=r.interleave,
            hidden_act="silu",
            num_key_value_heads=self.num_attention_heads,
            architectures=[
                "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
            ],
        )
        return d


_FIELD_NAMES = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope"}


def _rope_from_hf(raw: dict[str, Any], interleave: bool, source: str) -> RopeSpec:
    """RopeSpec from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (DeepSeek Hub)."""
    params = raw.get("rope_parameters")
    fld = "rope_parameters"
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        fld = "rope_scaling"
    else:
        params = dict(params)
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: config field {fld!r} must be an object, got {type(params).__name__}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in ("default", "yarn"):
        raise ConfigError(
            f"{source}: config field {fld!r}: rope type {rtype!r} not supported (default, yarn)"
        )
    if rtype == "default":
        return RopeSpec(theta=float(theta), interleave=interleave)
    factor = params.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ConfigError(f"{source}: config field '{fld}.factor' = {factor!r}: must be a positive number")
    return RopeSpec(
        theta=float(theta),
        rope_type="yarn",
        factor=None if factor is None else float(factor),
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings")
        ),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleave=interleave,
    )


def builtin_tiny_config() -> ModelConfig:
    """`builtin:tiny`: a small DeepSeek-V3-style model (first layer dense, 16 experts in 4 groups, 2 groups
    kept per token, YaRN rope, one MTP module) over a byte vocabulary (256 bytes + specials)."""
    from runtime.model.tokenizer import ByteTokenizer

    return ModelConfig(
        model_type="deepseek_v3",
        vocab_size=ByteTokenizer.VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=4096,
        rope=RopeSpec(
            theta=10000.0,
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=1024,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        num_nextn_predict_layers=1,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_id=ByteTokenizer.EOS,
        pad_token_id=ByteTokenizer.PAD,
    ).validate()
