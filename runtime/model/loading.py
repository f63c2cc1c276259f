"""`runtime.load_model`: an HF checkpoint directory or a builtin name -> a ready DeepseekModel."""

from __future__ import annotations

import os

import torch

from runtime.model.config import ModelConfig
from runtime.model.deepseek import DeepseekModel


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
    max_nodes_per_token: int = 0,
    all_layers: bool = False,
) -> DeepseekModel:
    """Load an HF-format model directory (config.json + safetensors) or `builtin:tiny` (seeded init).

    `mesh` is the parallel layout (None: single process, the whole model here). Under tp/ep > 1 the model is
    built on the meta device, its layers replaced by their TP/EP shards (`parallel.shard.parallelize`), and
    each rank reads only its slices and experts of every checkpoint tensor (`sharded_select`).
    `max_nodes_per_token` > 0 limits each token's experts to that many nodes of the EP group (the mesh's
    node map; `MOERUN_RANKS_PER_NODE` emulates nodes on one host). A mesh with pp > 1 is refused unless
    `all_layers`: then every rank gets every layer (TP/EP-sharded as above) and the caller cuts out its
    pipeline stage, as the trainer and multi-rank serving do.
    """
    from runtime.model.builtin import builtin_config, init_weights
    from runtime.model.hf_checkpoint import load_checkpoint

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if dtype is None:
            raise ValueError("dtype must be one of float32, bfloat16, float16")
    dtype = dtype or torch.float32
    if mesh is not None and mesh.size("pp") > 1 and not all_layers:
        raise NotImplementedError(
            "load_model builds whole-model or TP/EP shards; pipeline stages (pp > 1) are built by "
            "parallel.pipeline.stages from a model loaded with all_layers=True"
        )
    device = device or (str(mesh.device) if mesh is not None else "cpu")
    tp_group = mesh.group("tp") if mesh is not None and mesh.size("tp") > 1 else None
    ep_group = mesh.group("ep") if mesh is not None and mesh.size("ep") > 1 else None
    node_limit = None
    if ep_group is not None and max_nodes_per_token > 0:
        node_limit = ([mesh.node_of(r) for r in mesh.ranks("ep")], max_nodes_per_token)
    if path.startswith("builtin:"):
        cfg = builtin_config(path)
        model = build_model(cfg, torch.float32, "cpu", mtp=mtp)
        init_weights(model, seed)  # seeded init of the whole model: every layout gets the same weights
        model = model.to(device=device, dtype=dtype)
        _fp32_router_bias(model)
        if tp_group is not None or ep_group is not None:
            from parallel.shard import parallelize

            parallelize(model, tp_group, ep_group, node_limit=node_limit)
        return model.eval()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} is not a directory (expected an HF model dir or builtin:tiny)"
        )
    cfg = ModelConfig.from_file(path)
    if tp_group is None and ep_group is None:
        model = build_model(cfg, dtype, device, mtp=mtp)
        load_checkpoint(model, path, select=select)
        return model.eval()
    # Sharded: build on meta, swap in the TP/EP layers, then read only this rank's slices and experts.
    from parallel.shard import parallelize, sharded_select

    model = build_model(cfg, dtype, device, mtp=mtp, materialize=False)
    parallelize(model, tp_group, ep_group, node_limit=node_limit)
    model = model.to_empty(device=device)
    _fp32_router_bias(model)
    load_checkpoint(model, path, select=select or sharded_select(model))
    return model.eval()
