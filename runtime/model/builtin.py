"""Built-in models (`builtin:tiny`): a config and a deterministic initialization from a seed."""

from __future__ import annotations

import torch
from torch import nn

from parallel.shard import full_shape, shard_marks, to_local
from runtime.model.config import ModelConfig, builtin_tiny_config

BUILTINS = {"tiny": builtin_tiny_config}


def builtin_config(name: str) -> ModelConfig:
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        raise ValueError(
            f"unknown builtin model {name!r} (known: {', '.join('builtin:' + k for k in BUILTINS)})"
        )
    return BUILTINS[key]()


def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic init, independent of construction order and of any parallel layout: every tensor is
    drawn from its own generator seeded by (seed, its name), and a rank holding a shard (TP slice, its
    experts; parallel.shard marks) draws the full tensor and keeps its shard. Norm gains are 1, biases and
    the router correction bias 0, everything else N(0, std)."""
    marks = shard_marks(model)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                t.zero_()
            elif "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
                t.fill_(1.0)
            else:
                info = marks.get(name, {})
                g = torch.Generator().manual_seed(_name_seed(seed, name))
                full = torch.randn(full_shape(t.shape, info), generator=g, dtype=torch.float32) * std
                t.copy_(to_local(full, info, t.shape))


def _name_seed(seed: int, name: str) -> int:
    h = seed & 0xFFFFFFFF
    for ch in name.encode():
        h = (h * 1000003 + ch) & 0x7FFFFFFFFFFFFFFF
    return h
