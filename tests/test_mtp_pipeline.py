"""MTP under pipeline parallelism: the MTP module sits on the last stage (with the head), the first stage's
token embeddings travel with the activations to feed it, and its gradient comes back to the embedding.

2 spawned gloo ranks at pp=2 under 1f1b and under DualPipeV (where the last stage shares rank 0 with the
embedding) train builtin:tiny (which has one MTP module) for 3 steps with mtp_loss_coef 0.3 and the aux loss
on; every step's cross-entropy and MTP loss equal a single-process Trainer's within 1e-5, and the MTP
module's parameters end equal too (they only move through its own gradient).
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_spawn import run_spawn
from train_helpers import spawn_mesh, tiny_config

STEPS = 3


def _config(root: str, name: str, schedule: str):
    cfg = tiny_config(os.path.join(root, name), mtp_loss_coef=0.3, aux_loss_coef=1e-3, steps=STEPS)
    cfg["parallel"].update(pp=2 if schedule else 1, microbatches=4, schedule=schedule or "1f1b")
    return cfg


def _run(trainer) -> list[dict]:
    return [trainer.train_step(trainer.batch(step)) for step in range(STEPS)]


def _case(rank: int, world: int, root: str) -> None:
    from runtime.train.trainer import Trainer

    ref = Trainer(_config(root, f"single{rank}", ""))
    ref_steps = _run(ref)
    assert all(s["mtp"] > 0 for s in ref_steps)
    for schedule in ("1f1b", "dualpipev"):
        trainer = Trainer(_config(root, f"{schedule}{rank}", schedule), spawn_mesh(rank, world, pp=2))
        held = {n for n, _ in trainer.named_parameters()}
        steps = _run(trainer)
        for step, (got, want) in enumerate(zip(steps, ref_steps)):
            for key in ("loss", "mtp"):
                assert abs(got[key] - want[key]) < 1e-5, (schedule, step, key, got[key], want[key])
        ref_params = dict(ref.model.named_parameters())
        mtp = [n for n in held if n.startswith("mtp.")]
        assert bool(mtp) == ((schedule == "dualpipev") == (rank == 0)), (schedule, rank, mtp[:2])  # last stage
        for name in mtp:
            torch.testing.assert_close(dict(trainer.model.named_parameters())[name], ref_params[name],
                                       atol=1e-5, rtol=1e-5, msg=lambda m, n=name, s=schedule: f"{s} {n}: {m}")


@pytest.mark.timeout(240)
def test_mtp_loss_under_pp2_equals_single_process(tmp_path):
    run_spawn(_case, 2, str(tmp_path))
