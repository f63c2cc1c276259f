"""Shared helpers for the training tests: a job config for a tiny run, a token file, an HF-made model."""

from __future__ import annotations

import os

import numpy as np

from runtime.jobconfig import load_config


def token_file(directory, vocab: int, n: int = 4096, seed: int = 0) -> str:
    """A random 1-D int32 token file with a learnable pattern (a noisy repeating sequence)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, 97)
    tokens = np.resize(base, n).astype(np.int32)
    noise = rng.random(n) < 0.2
    tokens[noise] = rng.integers(0, vocab, int(noise.sum()))
    path = os.path.join(os.fspath(directory), "tokens.npy")
    np.save(path, tokens)
    return path


def tiny_config(out, model: str = "builtin:tiny", data: str = "builtin:tinytext", **train) -> dict:
    """10 steps of 4 sequences x 16 tokens, no aux loss / bias update / MTP unless given in `train`."""
    cfg = load_config(None, [])
    cfg["model"]["path"] = model
    cfg["data"].update(path=data, seq_len=16, shuffle=False)
    cfg["parallel"]["microbatches"] = 2
    cfg["train"].update(steps=10, lr=1e-3, warmup_steps=2, min_lr=1e-4, global_batch=4, aux_loss_coef=0.0,
                        bias_update_rate=0.0, mtp_loss_coef=0.0, out=os.fspath(out), save_every=0,
                        resume=True, grad_clip=1.0, weight_decay=0.1)
    cfg["train"].update(train)
    return cfg


def spawn_mesh(rank: int, world: int, tp: int = 1, pp: int = 1, ep: int = 1):
    """A Mesh over the default gloo group of a `dist_spawn.run_spawn` child (every rank makes every group, in
    the same order, as torch.distributed requires)."""
    import torch
    import torch.distributed as dist

    from cluster.env import RankInfo
    from cluster.layout import Layout
    from cluster.mesh import Mesh

    layout = Layout(world, pp=pp, dp=0, tp=tp, ep=ep)
    groups = {"world": dist.group.WORLD, "control": dist.group.WORLD}  # gloo: one group serves both
    for dim in ("tp", "pp", "dp", "ep", "edp"):
        for members in layout.groups(dim):
            g = dist.new_group(members)
            if rank in members:
                groups[dim] = g
    info = RankInfo(rank, world, rank, world, 0, 1, "localhost", "test")
    return Mesh(info, layout, [0] * world, groups, torch.device("cpu"), "gloo")


def hf_tiny(directory, seed: int = 0):
    """A tiny transformers DeepseekV3 saved to `directory` (no MTP weights: transformers writes none)."""
    from hf_models import make_hf_model

    return make_hf_model(directory, "deepseek_v3", seed=seed)
