"""`runtime.load_model`: an HF checkpoint directory or a builtin name -> a ready DeepseekModel.

One path for every layout: build on the meta device with the mesh's expert dispatcher (so each MoE layer
holds only this rank's experts), split for tensor parallelism by the model's own plan (`tp_plan()`), then
allocate and fill: a seeded init for builtin models, or each rank reading only its slices and experts of
every checkpoint tensor (`parallel.shard.sharded_select`).
"""

from __future__ import annotations

import os

import torch

from parallel.expert import Dispatcher
from parallel.shard import apply_tp_plan
from runtime.model.config import ModelConfig
from runtime.model.deepseek import DeepseekModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    mtp: bool = True,
    materialize: bool = True,
    dispatcher: Dispatcher | None = None,
    tp_group=None,
) -> DeepseekModel:
    """Construct without initializing (meta device, split by `tp_group`, then empty storage unless
    `materialize` is False), so building a big model is cheap."""
    with torch.device("meta"):
        model = DeepseekModel(cfg, mtp=mtp, dispatcher=dispatcher)
        apply_tp_plan(model, model.tp_plan(), tp_group)
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
    link=None,
) -> DeepseekModel:
    """Load an HF-format model directory (config.json + safetensors) or `builtin:tiny` (seeded init).

    `mesh` is the parallel layout (None: single process, the whole model here); see the module docstring.
    `max_nodes_per_token` > 0 limits each token's experts to that many nodes of the EP group (the mesh's
    node map; `MOERUN_RANKS_PER_NODE` emulates nodes on one host). `link`: an emulated interconnect
    (parallel.link) that delays every expert all-to-all. A mesh with pp > 1 is refused unless `all_layers`:
    then every rank gets every layer (TP/EP-sharded as above) and the caller cuts out its pipeline stages,
    as the trainer and multi-rank serving do.
    """
    from parallel.shard import sharded_select
    from runtime.model.builtin import builtin_config, init_weights
    from runtime.model.hf_checkpoint import load_checkpoint

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    if mesh is not None and mesh.size("pp") > 1 and not all_layers:
        raise NotImplementedError(
            "load_model builds whole-model or TP/EP shards; pipeline stages (pp > 1) are built by "
            "parallel.pipeline.stages from a model loaded with all_layers=True"
        )
    device = device or (str(mesh.device) if mesh is not None else "cpu")
    tp_group = mesh.group("tp") if mesh is not None and mesh.size("tp") > 1 else None
    if path.startswith("builtin:"):
        cfg = builtin_config(path)
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory (expected an HF model dir or "
                                "builtin:tiny)")
    else:
        cfg = ModelConfig.from_file(path)
    dispatcher = Dispatcher.from_mesh(mesh, cfg.n_routed_experts, max_nodes_per_token, link)
    if path.startswith("builtin:"):
        # seeded init in fp32 of every full tensor, of which this rank keeps its shard: every layout gets
        # the same weights
        model = build_model(cfg, torch.float32, "cpu", mtp=mtp, dispatcher=dispatcher, tp_group=tp_group)
        init_weights(model, seed)
        model = model.to(device=device, dtype=dtype)
        _fp32_router_bias(model)
        return model.eval()
    model = build_model(cfg, dtype, device, mtp=mtp, dispatcher=dispatcher, tp_group=tp_group)
    sharded = tp_group is not None or dispatcher.group is not None
    load_checkpoint(model, path, select=select or (sharded_select(model) if sharded else None))
    return model.eval()


def shard_model(full: DeepseekModel, dispatcher: Dispatcher | None = None, tp_group=None) -> DeepseekModel:
    """This rank's shard of a whole model under another layout, as a new model (the whole one stays): its
    experts (those of `dispatcher`) and its TP slices (`tp_group`), with the gates' loss settings and the
    train / eval mode copied. For checks of a layout against the single-process model it came from."""
    from parallel.shard import shard_marks, to_local

    p = full.lm_head.weight
    model = build_model(full.config, p.dtype, p.device, mtp=len(full.mtp) > 0, dispatcher=dispatcher,
                        tp_group=tp_group)
    marks = shard_marks(model)
    src = dict(full.named_parameters()) | dict(full.named_buffers())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.copy_(to_local(src[name].detach(), marks.get(name, {}), t.shape))
    for m, ref in zip(model.modules(), full.modules()):
        if hasattr(ref, "aux_loss_coef"):
            m.aux_loss_coef = ref.aux_loss_coef
    model.mtp_loss_coef = full.mtp_loss_coef
    return model.train(full.training)
