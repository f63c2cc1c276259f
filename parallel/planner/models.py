"""Model shapes the planner needs, built in (public HF config values) or read from an HF `config.json`.

The planner parses the json itself (pure Python) so that it runs without torch or the runtime package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    """DeepSeek-V2/V3-family shapes: MLA attention, dense first layers, then MoE layers (routed + shared)."""

    name: str
    hidden: int
    layers: int
    dense_layers: int           # first_k_dense_replace
    heads: int
    q_lora_rank: int            # 0: q is projected directly from the hidden state (V2-Lite)
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    intermediate: int           # dense FFN width
    moe_intermediate: int
    n_routed: int
    n_shared: int
    topk: int
    n_group: int = 1
    topk_group: int = 1
    vocab: int = 129280
    mtp_layers: int = 0         # num_nextn_predict_layers
    tie_embeddings: bool = False

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def check(self) -> ModelSpec:
        for f in ("hidden", "layers", "heads", "kv_lora_rank", "qk_nope", "qk_rope", "v_head", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model {self.name}: {f} must be > 0, got {getattr(self, f)}")
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError(f"model {self.name}: first_k_dense_replace={self.dense_layers} outside 0..{self.layers}")
        if self.moe_layers and (self.n_routed <= 0 or not 0 < self.topk <= self.n_routed):
            raise ValueError(f"model {self.name}: need n_routed_experts > 0 and 0 < num_experts_per_tok <= it")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"model {self.name}: need 1 <= topk_group <= n_group, "
                             f"got {self.topk_group}/{self.n_group}")
        return self


# Public HF config.json values (deepseek-ai/DeepSeek-V3, DeepSeek-V2, DeepSeek-V2-Lite, moonshotai/Kimi-K2).
BUILTIN: dict[str, ModelSpec] = {
    "deepseek-v3": ModelSpec(
        name="deepseek-v3", hidden=7168, layers=61, dense_layers=3, heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, intermediate=18432, moe_intermediate=2048,
        n_routed=256, n_shared=1, topk=8, n_group=8, topk_group=4, vocab=129280, mtp_layers=1),
    "deepseek-v2": ModelSpec(
        name="deepseek-v2", hidden=5120, layers=60, dense_layers=1, heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, intermediate=12288, moe_intermediate=1536,
        n_routed=160, n_shared=2, topk=6, n_group=8, topk_group=3, vocab=102400, mtp_layers=0),
    "deepseek-v2-lite": ModelSpec(
        name="deepseek-v2-lite", hidden=2048, layers=27, dense_layers=1, heads=16, q_lora_rank=0,
        kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, intermediate=10944, moe_intermediate=1408,
        n_routed=64, n_shared=2, topk=6, n_group=1, topk_group=1, vocab=102400, mtp_layers=0),
    "kimi-k2": ModelSpec(
        name="kimi-k2", hidden=7168, layers=61, dense_layers=1, heads=64, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, intermediate=18432, moe_intermediate=2048,
        n_routed=384, n_shared=1, topk=8, n_group=1, topk_group=1, vocab=163840, mtp_layers=0),
}


def from_hf_config(cfg: dict, name: str = "config.json") -> ModelSpec:
    """A ModelSpec from a parsed HF config (model_type deepseek_v2 / deepseek_v3 / kimi_k2)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "vocab_size")
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{name}: not an MLA (DeepSeek-V2/V3-style) config, missing {', '.join(missing)}")
    n_routed = int(cfg.get("n_routed_experts") or 0)
    layers = int(cfg["num_hidden_layers"])
    return ModelSpec(
        name=str(cfg.get("_name_or_path") or os.path.splitext(os.path.basename(name))[0] or "model"),
        hidden=int(cfg["hidden_size"]),
        layers=layers,
        dense_layers=int(cfg.get("first_k_dense_replace") or 0) if n_routed else layers,
        heads=int(cfg["num_attention_heads"]),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope=int(cfg["qk_nope_head_dim"]),
        qk_rope=int(cfg["qk_rope_head_dim"]),
        v_head=int(cfg["v_head_dim"]),
        intermediate=int(cfg.get("intermediate_size") or 0),
        moe_intermediate=int(cfg.get("moe_intermediate_size") or 0),
        n_routed=n_routed,
        n_shared=int(cfg.get("n_shared_experts") or 0),
        topk=int(cfg.get("num_experts_per_tok") or 0),
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        vocab=int(cfg["vocab_size"]),
        mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    ).check()


def load_model(spec: str) -> ModelSpec:
    """A built-in name (deepseek-v3, ...) or a path to an HF config.json (or a directory holding one)."""
    key = spec.lower()
    if key in BUILTIN:
        return BUILTIN[key]
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"model {spec!r} is neither built in ({', '.join(BUILTIN)}) nor a config.json path")
    with open(path, encoding="utf-8") as fh:
        try:
            cfg = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return from_hf_config(cfg, name=path)


def with_overrides(spec: ModelSpec, **kw) -> ModelSpec:
    return replace(spec, **kw).check()
