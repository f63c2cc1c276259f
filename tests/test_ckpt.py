"""Checkpoints: exact resume after a kill, a kill in the middle of writing, HF export (transformers loads it
with the same logits), optimizer state round trip, `moerun ckpt`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from launchers import moerun
from train_helpers import hf_tiny, tiny_config

from runtime.train import checkpoint as ckpt
from runtime.train.metrics import read_metrics
from runtime.train.trainer import Trainer, resume_path


def _toml(cfg: dict, path) -> str:
    lines = []
    for sec, body in cfg.items():
        lines.append(f"[{sec}]")
        for k, v in body.items():
            if isinstance(v, dict):
                v = "{ " + ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items()) + " }"
            else:
                v = json.dumps(v)
            lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _fit_in_child(cfg: dict, env: dict[str, str]) -> None:
    os.environ.update(env)
    Trainer(cfg, resume_from=resume_path(cfg), log=lambda m: None).fit()


def _forked_run(cfg: dict, **env: str) -> int:
    """A training run in a forked child (no second torch start-up); its exit code."""
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=_fit_in_child, args=(cfg, env))
    p.start()
    p.join(120)
    return p.exitcode


@pytest.mark.timeout(240)
def test_kill_and_torn_checkpoint_resume_exactly(tmp_path):
    ref_cfg = tiny_config(tmp_path / "ref", save_every=5, aux_loss_coef=1e-3, bias_update_rate=1e-3,
                          mtp_loss_coef=0.3)
    Trainer(ref_cfg, log=lambda m: None).fit()
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_cfg["train"]["out"])}

    cfg = dict(ref_cfg, train=dict(ref_cfg["train"], out=str(tmp_path / "run")))
    out = cfg["train"]["out"]
    # 1. killed right after step 7 (the step-5 checkpoint exists; steps 6, 7 are lost)
    assert _forked_run(cfg, MOERUN_TEST_EXIT_AFTER_STEP="7") == 19
    assert ckpt.latest_checkpoint(out).endswith("step-5")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 8))
    # 2. resumed, and killed in the middle of writing the step-10 checkpoint
    assert _forked_run(cfg, MOERUN_TEST_CRASH_IN_CKPT="10") == 17
    root = os.path.join(out, "ckpt")
    assert os.path.isdir(os.path.join(root, ".tmp-step-10")) and not os.path.exists(os.path.join(root, "step-10"))
    assert open(os.path.join(root, "latest")).read().strip() == "step-5"
    assert ckpt.latest_checkpoint(out).endswith("step-5")
    # 3. resumed again, through the CLI: from step 5, steps 6..10 equal the uninterrupted run
    r = moerun(["train", _toml(cfg, tmp_path / "job.toml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "step-5" in r.stdout
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 11))
    for x in rows:
        assert abs(x["loss"] - ref[x["step"]]) <= 1e-6 * abs(ref[x["step"]]), (x["step"], x["loss"], ref)
    assert ckpt.latest_checkpoint(out).endswith("step-10")
    assert not os.path.exists(os.path.join(root, ".tmp-step-10"))


def test_resume_restores_optimizer_and_biases(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, save_every=3, bias_update_rate=1e-2)
    a = Trainer(cfg)
    a.fit()
    path = resume_path(cfg)
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 3 and manifest["data"]["next_step"] == 3
    assert manifest["layout"] == {"pp": 1, "dp": 1, "tp": 1, "ep": 1, "world": 1, "schedule": "1f1b"}
    b = Trainer(cfg, resume_from=path)
    assert b.step == 3 and b.optimizer.steps == 3
    for x, y in zip(a.optimizer.buckets, b.optimizer.buckets):
        for kind in ckpt.OPT_KINDS:
            assert torch.equal(getattr(x, kind), getattr(y, kind))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    for g, h in zip(a.gates, b.gates):
        assert torch.equal(g.e_score_correction_bias, h.e_score_correction_bias)
        assert float(g.e_score_correction_bias.abs().max()) > 0


@pytest.mark.parametrize("model", ["hf", "builtin"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, model):
    from transformers import AutoModelForCausalLM

    path = hf_tiny(tmp_path / "hf")[0] if model == "hf" else "builtin:tiny"
    cfg = tiny_config(tmp_path / "run", model=path, steps=2, save_every=2, mtp_loss_coef=0.3,
                      bias_update_rate=1e-2)
    if model == "hf":
        from train_helpers import token_file

        cfg["data"]["path"] = token_file(tmp_path, 96)
    trainer = Trainer(cfg)
    trainer.fit()
    from launch.cli import main

    assert main(["ckpt", "export", cfg["train"]["out"], "--out", str(tmp_path / "export")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager").eval()
    ids = torch.randint(0, trainer.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trainer.model.eval().logits(ids)
        theirs = hf(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    import runtime

    again = runtime.load_model(str(tmp_path / "export"))
    with torch.no_grad():  # the same (inference) code path as `ours`: the weights alone must explain a difference
        torch.testing.assert_close(again.logits(ids), ours, atol=1e-6, rtol=1e-6)
    if model == "builtin":  # the export carries a byte tokenizer equal to runtime's ByteTokenizer
        from transformers import AutoTokenizer

        from runtime.model.tokenizer import ByteTokenizer, load_tokenizer

        text = "Ada and Bram crossed the bridge. Grüße ✓\n"
        want = ByteTokenizer().encode(text)
        tok = load_tokenizer(str(tmp_path / "export"))
        assert tok.encode(text) == want and tok.decode(want) == text
        assert tok.vocab_size == ByteTokenizer.VOCAB_SIZE
        assert AutoTokenizer.from_pretrained(str(tmp_path / "export"))(text, add_special_tokens=False)[
            "input_ids"] == want


def test_ckpt_cli_info_and_errors(tmp_path, capsys):
    from launch.cli import main

    cfg = tiny_config(tmp_path, steps=1, save_every=1)
    Trainer(cfg).fit()
    assert main(["ckpt", "info", str(tmp_path)]) == 0
    assert '"step": 1' in capsys.readouterr().out
    assert main(["ckpt", "export", str(tmp_path / "nothing")]) != 0
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_weight_files_get_the_mode_the_umask_allows(tmp_path, umask):
    """safetensors writes through a private temporary file (0600): weight files of a checkpoint, its export
    and save_hf_checkpoint must get the mode every other file there gets (0666 minus the umask)."""
    import runtime
    from launch.cli import main
    from runtime.model.hf_checkpoint import save_hf_checkpoint

    old = os.umask(umask)
    try:
        cfg = tiny_config(tmp_path / "run", steps=1, save_every=1)
        Trainer(cfg, log=lambda m: None).fit()
        assert main(["ckpt", "export", cfg["train"]["out"], "--out", str(tmp_path / "export")]) == 0
        save_hf_checkpoint(runtime.load_model("builtin:tiny"), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    dirs = [ckpt.latest_checkpoint(cfg["train"]["out"]), str(tmp_path / "export"), str(tmp_path / "hf")]
    for d in dirs:
        names = sorted(os.listdir(d))
        assert any(n.endswith(".safetensors") for n in names) and any(n.endswith(".json") for n in names), names
        modes = {n: oct(os.stat(os.path.join(d, n)).st_mode & 0o777) for n in names}
        assert set(modes.values()) == {oct(want)}, (d, modes)


def _mtp_layers_held(directory: str, num_hidden_layers: int) -> set[int]:
    from runtime.model.hf_checkpoint import checkpoint_files

    return {int(n.split(".")[2]) for n in checkpoint_files(directory)
            if n.startswith("model.layers.") and int(n.split(".")[2]) >= num_hidden_layers}


@pytest.mark.parametrize("mtp_loss_coef", [0.3, 0.0], ids=["mtp-trained", "mtp-off"])
def test_checkpoint_and_export_config_match_the_mtp_weights_held(tmp_path, mtp_loss_coef):
    """A model trained without its MTP module (mtp_loss_coef = 0 here; pp > 1 in test_train_mpi) is saved
    and exported with num_nextn_predict_layers = 0, not the 1 of the config it was built from."""
    from launch.cli import main

    cfg = tiny_config(tmp_path / "run", steps=1, save_every=1, mtp_loss_coef=mtp_loss_coef)
    Trainer(cfg, log=lambda m: None).fit()
    assert main(["ckpt", "export", cfg["train"]["out"], "--out", str(tmp_path / "export")]) == 0
    want = 1 if mtp_loss_coef else 0
    for d in (ckpt.latest_checkpoint(cfg["train"]["out"]), str(tmp_path / "export")):
        with open(os.path.join(d, "config.json")) as f:
            hf_config = json.load(f)
        n = hf_config["num_hidden_layers"]
        assert hf_config["num_nextn_predict_layers"] == want, d
        assert _mtp_layers_held(d, n) == set(range(n, n + want)), d


def test_exported_tokenizer_gives_hf_and_moerun_the_same_prompt_ids(tmp_path):
    """The server encodes a prompt with BOS (whenever the model has a bos id); transformers' tokenizer loaded
    from the export must give the same ids for the same text, BOS included, and decode them alike."""
    from transformers import AutoTokenizer

    from launch.cli import main
    from runtime.model.tokenizer import ByteTokenizer, load_tokenizer

    cfg = tiny_config(tmp_path / "run", steps=1, save_every=1)
    Trainer(cfg, log=lambda m: None).fit()
    out = str(tmp_path / "export")
    assert main(["ckpt", "export", cfg["train"]["out"], "--out", out]) == 0
    ours = load_tokenizer(out)
    hf = AutoTokenizer.from_pretrained(out)
    assert ours.bos_id == hf.bos_token_id == ByteTokenizer.BOS
    for text in ("Hello", "Ada and Bram crossed the bridge. Grüße ✓\n", " leading space", "日本語"):
        served = ours.encode(text, add_bos=ours.bos_id is not None)  # what runtime/serve/server.py sends the engine
        assert served[0] == ByteTokenizer.BOS and served[1:] == ByteTokenizer().encode(text)
        assert hf(text)["input_ids"] == served, text
        assert hf.decode(served, skip_special_tokens=True) == ours.decode(served) == text


@pytest.mark.timeout(180)
def test_re_saving_a_step_never_loses_the_old_copy(tmp_path, monkeypatch):
    """A re-save whose final rename fails (a full disk) leaves the old step-N whole and current."""
    from runtime.model.loading import load_model

    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg)
    first = trainer.save()
    real = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    with pytest.raises(ckpt.CheckpointSaveError):
        trainer.save()
    assert ckpt.latest_checkpoint(cfg["train"]["out"]) == first and ckpt.is_complete(first)
    monkeypatch.setattr(ckpt.os, "rename", real)
    assert trainer.save() == first  # a re-save that works replaces it
    assert sorted(os.listdir(os.path.dirname(first))) == ["latest", "step-0"]
    saved = load_model(first, mtp=False)  # the model files now hold the changed weights
    assert torch.equal(next(saved.parameters()), next(trainer.model.parameters()))
