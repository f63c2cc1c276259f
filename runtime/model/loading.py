"""`runtime.load_model`: an HF checkpoint directory or a builtin name -> a ready DeepseekModel.

One path for every layout: build on the meta device only what this rank owns (under pp > 1 its pipeline
stages' layers, both stages under DualPipe(V), and the embedding / final norm / LM head where its stages
have them), with the mesh's expert dispatcher (so each MoE layer holds only this rank's experts), split for
tensor parallelism by the model's own plan (`tp_plan()`), then allocate and fill: a seeded init for builtin
models that draws only the rows a rank holds, or each rank reading only its slices and experts of every
checkpoint tensor it owns (`parallel.shard.sharded_select`; FP8 blocks dequantised for the owned rows
only). No full model and no full tensor of a sharded weight is ever allocated. Under `FakeTensorMode` (a dry
run) nothing is read: the tensors are fake.
"""

from __future__ import annotations

import os

import torch

from cluster.fake import no_fake_mode
from parallel.expert import Dispatcher
from parallel.pipeline.stages import HeldParts, held_parts
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
    parts: HeldParts | None = None,
) -> DeepseekModel:
    """Construct without initializing (meta device, only `parts`, split by `tp_group`, then empty storage
    unless `materialize` is False), so building a big model is cheap."""
    with no_fake_mode(), torch.device("meta"):  # plain meta tensors, also in a dry run
        model = DeepseekModel(cfg, mtp=mtp, dispatcher=dispatcher, parts=parts)
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
    schedule: str | None = None,
    link=None,
) -> DeepseekModel:
    """Load an HF-format model directory (config.json + safetensors) or `builtin:NAME` (seeded init).

    `mesh` is the parallel layout (None: single process, the whole model here); see the module docstring.
    Under pp > 1, `schedule` (the job's `parallel.schedule`) says which stages this rank holds; the caller
    cuts them with `parallel.pipeline.stages.build_stages` (the trainer and multi-rank serving do).
    `max_nodes_per_token` > 0 limits each token's experts to that many nodes of the EP group (the mesh's
    node map; `MOERUN_RANKS_PER_NODE` emulates nodes on one host). `link`: an emulated interconnect
    (parallel.link) that delays every expert all-to-all.
    """
    from cluster.fake import fake_mode_active
    from parallel.shard import sharded_select
    from runtime.model.builtin import builtin_config, init_weights
    from runtime.model.hf_checkpoint import load_checkpoint

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    pp = mesh.size("pp") if mesh is not None else 1
    if pp > 1 and schedule is None:
        raise ValueError("load_model under pp > 1 needs the pipeline schedule (parallel.schedule): it decides "
                         "which stages this rank builds")
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
    parts = held_parts(cfg.num_hidden_layers, schedule, pp, mesh.coord("pp")) if pp > 1 else None
    model = build_model(cfg, dtype, device, mtp=mtp, dispatcher=dispatcher, tp_group=tp_group, parts=parts)
    if path.startswith("builtin:"):
        init_weights(model, seed)  # per-row seeded streams: every layout gets the same weights
    elif not fake_mode_active():
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
