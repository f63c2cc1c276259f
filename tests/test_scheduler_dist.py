"""The shared scheduler across ranks: the driver decides and broadcasts, the other rank follows.

ep=2 on 2 spawned gloo ranks. First, with the sharded model, the logprobs serving returns equal the
training forward's (1e-5, fp32) and every token is routed to the same experts. Then: serve, apply a GRPO
`train` op, serve again, run one step of the config's training job, all through `Scheduler.step()` on
rank 0 and `Scheduler.follow()` on rank 1, checked against a single-process copy given the same ops:
greedy outputs before and after, the full-vocabulary logits after the updates (1e-4, fp32), and
parameter bytes per rank equal to those of a training-only Trainer on the same layout.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_spawn import run_spawn
from test_rl import _serve_vs_train
from train_helpers import tiny_config


class _Mesh:
    """The part of cluster.Mesh the Trainer uses, over groups made from the same Layout arithmetic."""

    def __init__(self, rank: int, world: int, tp: int = 1, ep: int = 1) -> None:
        import torch.distributed as dist

        from cluster.layout import Layout

        self.layout = Layout(world=world, tp=tp, ep=ep)
        self.rank, self.world_size, self.device = rank, world, torch.device("cpu")
        self._groups = {"world": dist.group.WORLD, "control": dist.group.WORLD}  # gloo: the same group
        for dim in ("tp", "pp", "dp", "ep", "edp"):
            for members in self.layout.groups(dim):
                g = dist.new_group(members)
                if rank in members:
                    self._groups[dim] = g

    def group(self, dim: str):
        return self._groups[dim]

    def size(self, dim: str) -> int:
        return self.world_size if dim == "world" else self.layout.size(dim)

    def coord(self, dim: str) -> int:
        return self.layout.coords(self.rank)[dim]

    def ranks(self, dim: str) -> list[int]:
        return self.layout.group_of(dim, self.rank)


PROMPT = [7, 1, 8, 2, 8, 1, 8]


def _op():
    from runtime.sched.rl import RLBatch

    g = torch.Generator().manual_seed(9)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (10, 8, 10, 6)]
    return RLBatch.from_lists(rows, [[0] * 3 + [1] * (len(r) - 3) for r in rows], [1.0, -1.0, 0.5, -0.5],
                              [[-4.0] * len(r) for r in rows], "grpo", kl_coef=0.3)


def _apply(work, sched=None) -> None:
    """Run the queued ops: through the scheduler (driver) or directly (the offline copy)."""
    while work.has_work():
        if sched is not None:
            sched.step()
        else:
            item = work.pop()
            (work.run_micro if item.kind.name == "TRAIN_MICRO" else work.run_optim)(item)


def _serve(sched, rid: str) -> list[int]:
    from runtime.serve import SamplingParams

    sched.engine.add_request(rid, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    out: list[int] = []
    while sched.engine.has_work():
        for o in sched.step()[1]:
            out += o.ids
    return out


def _case(rank: int, world: int, out_dir: str) -> None:

    from runtime.sched.scheduler import Scheduler, SchedulerConfig
    from runtime.sched.weights import WeightVersions, param_bytes
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.train.trainer import Trainer

    cfg = tiny_config(os.path.join(out_dir, f"r{rank}"), lr=3e-3, warmup_steps=0)
    mesh = _Mesh(rank, world, ep=2)
    trainer = Trainer(cfg, mesh)
    local = [p.shape[0] for n, p in trainer.model.named_parameters() if n.endswith("mlp.experts.gate_proj")]
    assert local and set(local) == {trainer.model.config.n_routed_experts // 2}  # experts really sharded
    # Served logprobs == the training forward's (1e-5), and the same experts for every token, under ep=2.
    err, mism = _serve_vs_train(trainer.model, PROMPT + [9, 9], 10, prefill_chunk=4)
    assert err < 1e-5 and mism == 0, (rank, err, mism)
    engine = Engine(trainer.model, max_batch=4, max_model_len=64, max_prefill_tokens=16, page_size=8,
                    kv_cache_tokens=256)
    work = TrainWork(trainer, reference=True)  # the KL term's reference rides along (broadcast kl_coef)
    sched = Scheduler(engine, work, SchedulerConfig("serve_first"), WeightVersions(engine),
                      group=mesh.group("control"), src=0, rank=rank)
    served = []
    if rank == 0:
        served.append(_serve(sched, "a"))
        work.submit(_op(), True)
        _apply(work, sched)
        served.append(_serve(sched, "b"))
        work.job_left = 1  # then one step of the config's job: each dp rank reads its own share
        _apply(work, sched)
        sched.stop()
    else:
        while sched.follow():
            pass
    assert sched.weights.version == 2 and trainer.step == 2  # the follower ran the same optimizer steps
    ids = torch.tensor([PROMPT + [3, 4, 5]])
    trainer.model.eval()
    logits = trainer.model.logits(ids)  # collective: every rank

    alone = Trainer(cfg, mesh)  # training only, same layout: the same parameter bytes
    assert param_bytes(alone.model) == param_bytes(engine.model) < param_bytes(_reference(cfg).model)
    assert param_bytes(work.ref_model) == param_bytes(engine.model)  # the optional KL reference: one copy

    if rank == 0:
        ref = _reference(cfg)
        ref_work = TrainWork(ref, reference=True)
        ref_eng = Engine(ref.model, max_batch=4, max_model_len=64, max_prefill_tokens=16, page_size=8,
                         kv_cache_tokens=256)
        ref_sched = Scheduler(ref_eng, ref_work, SchedulerConfig("serve_first"))
        expect = [_serve(ref_sched, "a")]
        ref_work.submit(_op(), True)
        _apply(ref_work)
        expect.append(_serve(ref_sched, "b"))
        ref_work.job_left = 1
        _apply(ref_work)
        assert served == expect, (served, expect)
        ref.model.eval()
        ref_logits = ref.model.logits(ids)
        err = (logits - ref_logits).abs().max().item()
        # 1e-5 before any update (tests/test_tensor_parallel_model.py); after one AdamW step the reassociation
        # noise of near-zero gradients is normalized up to ~lr-sized moves, so allow a bit more here.
        assert err < 1e-4, err
        moved = (ref_logits - Trainer(cfg).model.logits(ids)).abs().max().item()
        assert moved > 1e-3, moved  # the update did change the model


def _reference(cfg):
    from runtime.train.trainer import Trainer

    return Trainer(cfg)


@pytest.mark.timeout(240)
def test_scheduler_ep2_driver_and_follower_match_single_process(tmp_path):
    run_spawn(_case, 2, str(tmp_path))
