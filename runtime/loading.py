"""`runtime.load_model`: an HF checkpoint directory or a builtin name -> a ready DeepseekModel."""

from __future__ import annotations

import os

import torch

from runtime.config import ModelConfig
from runtime.model import DeepseekModel


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    mtp: bool = True,
    materialize: bool = True,
) -> DeepseekModel:
    """Construct without initializing (meta device, then empty storage), so building a big model is cheap."""
    with torch.device("meta"):
        model = DeepseekModel(cfg, mtp=mtp)
    model = model.to(dtype)
    if materialize:
        model = model.to_empty(device=device)
        _fp32_router_bias(model)
    return model


def _fp32_router_bias(model: torch.nn.Module) -> None:
    for m in model.modules():
        b = getattr(m, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor) and b.dtype != torch.float32:
            m.e_score_correction_bias = b.float()


def load_model(
    path: str,
    mesh=None,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | None = None,
    seed: int = 0,
    mtp: bool = True,
    select=None,
) -> DeepseekModel:
    """Load an HF-format model directory (config.json + safetensors) or `builtin:tiny` (seeded init).

    `mesh` is the parallel layout (None: single process, the whole model here). Sharding by mesh is done by
    the parallel layer (parallel/), which passes a `select` hook to the checkpoint loader; see docs/model.md.
    """
    from runtime.builtin import builtin_config, init_weights
    from runtime.checkpoint import load_checkpoint

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if dtype is None:
            raise ValueError("dtype must be one of float32, bfloat16, float16")
    dtype = dtype or torch.float32
    if mesh is not None and any(mesh.size(d) > 1 for d in ("tp", "pp", "ep")):
        raise NotImplementedError(
            "sharding by mesh (tp/pp/ep > 1) is done by the parallel layer (parallel/); "
            "this loader builds the whole model (mesh=None or tp=pp=ep=1)"
        )
    device = device or "cpu"
    if path.startswith("builtin:"):
        cfg = builtin_config(path)
        model = build_model(cfg, torch.float32, "cpu", mtp=mtp)
        init_weights(model, seed)
        model = model.to(device=device, dtype=dtype)
        _fp32_router_bias(model)
        return model.eval()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} is not a directory (expected an HF model dir or builtin:tiny)"
        )
    cfg = ModelConfig.from_file(path)
    model = build_model(cfg, dtype, device, mtp=mtp)
    load_checkpoint(model, path, select=select)
    return model.eval()
