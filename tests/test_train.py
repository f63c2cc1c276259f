"""Single-process training: parity with a plain torch.optim.AdamW loop over the transformers model, the LR
schedule, the metrics contract, bias-update balancing, bfloat16, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import hf_tiny, tiny_config, token_file

from runtime.train.metrics import read_metrics
from runtime.train.optim import lr_at
from runtime.train.trainer import Trainer


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] > 0.1 and lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def _plain_adamw_losses(hf, cfg, steps):
    """The reference: transformers' model, torch.optim.AdamW, torch's clip_grad_norm_, the same data."""
    from runtime.train.data import TokenData

    tr = cfg["train"]
    hf.train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr["eps"])
    data = TokenData(cfg["data"]["path"], cfg["data"]["seq_len"], tr["global_batch"], False)
    losses = []
    for s in range(steps):
        inputs, labels = data.batch(s)
        logits = hf(input_ids=inputs, use_cache=False).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), tr["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(s, tr["lr"], tr["min_lr"], tr["warmup_steps"], tr["steps"])
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_single_process_matches_plain_adamw_over_transformers(tmp_path):
    path, hf = hf_tiny(tmp_path / "hf")
    cfg = tiny_config(tmp_path / "run", model=path, data=token_file(tmp_path, hf.config.vocab_size))
    summary = Trainer(cfg).fit()
    ours = [m["loss"] for m in read_metrics(cfg["train"]["out"])]
    ref = _plain_adamw_losses(hf, cfg, 10)
    print("moerun", ours, "\ntorch ", ref)
    assert len(ours) == 10 and summary["last_step"] == 10
    assert ours[-1] < ours[0]  # it learns
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, ref)


def test_metrics_contract_and_loss_parts(tmp_path, capsys):
    cfg = tiny_config(tmp_path, steps=3, aux_loss_coef=1e-3, mtp_loss_coef=0.3, bias_update_rate=1e-3)
    Trainer(cfg).fit()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "time_s", "mtp", "aux"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["aux"] > 0 and r["mtp"] > 0 and r["time_s"] > 0
    out = capsys.readouterr().out
    assert "step 3/3 | loss" in out and "tok/s" in out and "ETA" in out
    assert "tokens/s" in out and "peak memory" in out  # the summary


def test_bias_updates_balance_the_experts(tmp_path):
    """builtin:tiny with aux-loss-free bias updates against a control run without them (same init, data,
    and learning rate): over the last 5 of 50 steps the max/mean expert load is below 0.8x the control's.
    Catches a bias update with the wrong sign, one that never reaches the gates, or one applied to a copy
    (the control shows what training alone does to the balance: it drifts, it does not improve)."""
    imbalance = {}
    for rate in (0.003, 0.0):
        cfg = tiny_config(tmp_path / str(rate), steps=50, bias_update_rate=rate, lr=1e-4, min_lr=1e-4,
                          warmup_steps=0, global_batch=8)
        cfg["data"]["seq_len"] = 64  # 512 tokens per step: load counts large enough to see through the noise
        cfg["parallel"]["microbatches"] = 1
        trainer = Trainer(cfg)
        trainer.fit()
        imbalance[rate] = [r["expert_load_max_mean"] for r in read_metrics(str(tmp_path / str(rate)))]
        moved = [float(g.e_score_correction_bias.abs().max()) > 0 for g in trainer.gates]
        assert all(moved) if rate else not any(moved)
    tail = {rate: sum(v[-5:]) / 5 for rate, v in imbalance.items()}
    print("max/mean load over the last 5 steps, with and without bias updates:", tail)
    assert tail[0.003] < 0.8 * tail[0.0], tail
    assert tail[0.003] < 0.8 * sum(imbalance[0.003][:5]) / 5  # and it improved on where it started


def test_bias_rate_zero_leaves_biases(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    trainer = Trainer(cfg)
    trainer.fit()
    assert all(float(g.e_score_correction_bias.abs().max()) == 0 for g in trainer.gates)


def test_bfloat16_compute_keeps_fp32_masters(tmp_path):
    cfg = tiny_config(tmp_path, steps=3)
    cfg["model"]["dtype"] = "bfloat16"
    trainer = Trainer(cfg)
    trainer.fit()
    p = trainer.model.lm_head.weight
    assert p.dtype == torch.bfloat16
    assert all(b.master.dtype == torch.float32 for b in trainer.optimizer.buckets)
    rows = read_metrics(str(tmp_path))
    assert rows[-1]["loss"] < rows[0]["loss"] + 0.1 and all(math.isfinite(r["loss"]) for r in rows)


def test_bad_token_ids_name_the_problem(tmp_path):
    import numpy as np

    np.save(tmp_path / "big.npy", np.full(1000, 5000, dtype=np.int32))
    cfg = tiny_config(tmp_path, data=str(tmp_path / "big.npy"), steps=1)
    with pytest.raises(ValueError, match="out of range"):
        Trainer(cfg).fit()


def test_fp8_recipe_trains_close_to_fp32(tmp_path):
    """train.fp8 = true swaps in ops.fp8_train's FP8 linears/experts; the first loss stays near fp32's."""
    base = tiny_config(tmp_path / "fp32", steps=1)
    Trainer(base).fit()
    cfg = tiny_config(tmp_path / "fp8", steps=1, fp8=True)
    trainer = Trainer(cfg)
    trainer.fit()
    assert type(trainer.model.model.layers[0].self_attn.q_a_proj).__name__ == "Fp8Linear"
    ref = read_metrics(str(tmp_path / "fp32"))
    got = read_metrics(str(tmp_path / "fp8"))
    assert all(math.isfinite(r["loss"]) for r in got)
    assert abs(got[0]["loss"] - ref[0]["loss"]) < 0.02 * ref[0]["loss"]


def test_config_errors_name_the_key(tmp_path):
    from launch.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--set", "train.stepz=3"])
    assert "train.stepz" in str(exc.value) and "train.steps" in str(exc.value)
    cfg = tiny_config(tmp_path, global_batch=6)
    cfg["parallel"]["microbatches"] = 4
    trainer = Trainer(cfg)  # without a pipeline, micro-batches adapt to what divides (6 -> 3 of 2)
    assert len(trainer.microbatch_slices(6)) == 3


def test_max_nodes_per_token_reaches_the_model(tmp_path, monkeypatch):
    """parallel.max_nodes_per_token is handed to load_model (which builds the gates' NodeLimit under EP)."""
    import runtime.train.trainer as trainer_mod

    seen = {}
    real = trainer_mod.load_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "load_model", spy)
    cfg = tiny_config(tmp_path, steps=1)
    cfg["parallel"]["max_nodes_per_token"] = 3
    Trainer(cfg)
    assert seen["max_nodes_per_token"] == 3
