"""`moerun dryrun`: one rank of a larger job run on fake tensors (runtime/dryrun.py) agrees with the planner's
memory model of moerun's trainer (parallel/planner, recipe "moerun") within 10% on the peak, for ranks of
the first and last pipeline stages under 1F1B, DualPipeV and DualPipe (with MTP), and EP without a
pipeline. The dry run counts what the real code allocates; the planner computes it from the config alone.
The model is DeepSeek-V3's architecture at a small size with 1024-token sequences, so that activations,
not the optimizer step, set most peaks (both kinds of peak are checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime.jobconfig import load_config
from tests.launchers import ROOT, base_env

SMALL = dict(hidden_size=512, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=48,
             qk_rope_head_dim=16, v_head_dim=32, intermediate_size=1024, moe_intermediate_size=160,
             num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
             num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=2048, num_nextn_predict_layers=0,
             max_position_embeddings=4096)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A config.json alone: a dry run reads no weights."""
    from runtime.model.builtin import DEEPSEEK_V3

    d = tmp_path_factory.mktemp("dryrun-model")
    (d / "config.json").write_text(json.dumps({**DEEPSEEK_V3, **SMALL}))
    return d


def _config(model_dir, pp: int, ep: int, schedule: str, microbatches: int, dp: int, seq: int = 1024, **model):
    path = model_dir
    if model:
        path = model_dir.parent / ("m-" + "-".join(f"{k}{v}" for k, v in sorted(model.items())))
        path.mkdir(exist_ok=True)
        raw = json.loads((model_dir / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**raw, **model}))
    return load_config(None, [f"model.path={path}", "model.dtype=bfloat16", f"parallel.pp={pp}",
                              f"parallel.ep={ep}", f"parallel.schedule={schedule}",
                              f"parallel.microbatches={microbatches}", f"train.global_batch={dp * microbatches}",
                              f"data.seq_len={seq}", "train.mtp_loss_coef=0.3"])


CASES = [  # world, rank, (pp, ep, schedule, microbatches, dp), model overrides
    (4, 0, (2, 2, "1f1b", 4, 2), {}),
    (4, 3, (2, 2, "1f1b", 4, 2), {}),
    (4, 0, (2, 2, "dualpipev", 4, 2), {}),
    (8, 7, (4, 2, "dualpipe", 8, 2), {"num_hidden_layers": 8, "num_nextn_predict_layers": 1}),
    (2, 1, (1, 2, "1f1b", 2, 2), {}),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,rank,layout,model", CASES, ids=[f"w{c[0]}r{c[1]}-{c[2][2]}" for c in CASES])
def test_planner_agrees_with_dry_run_within_10_percent(model_dir, world, rank, layout, model):
    from runtime.dryrun import dry_run, planner_prediction

    pp, ep, schedule, mb, dp = layout
    config = _config(model_dir, pp, ep, schedule, mb, dp, **model)
    report = dry_run(config, world, rank, ranks_per_node=world)
    plan = planner_prediction(config, world, rank, ranks_per_node=world)
    print(f"rank {rank}/{world} {layout}: dry run peak {report['peak'] / 1e6:.1f} MB "
          f"(forward/backward {report['peak_forward_backward'] / 1e6:.1f}), planner {plan['peak'] / 1e6:.1f} "
          f"({plan['peak_forward_backward'] / 1e6:.1f})")
    assert report["parameters"] == pytest.approx(plan["weights"], rel=0.01)  # the same rank's share
    assert report["optimizer"] == pytest.approx(plan["optimizer"], rel=0.01)
    assert abs(plan["peak"] - report["peak"]) <= 0.10 * report["peak"]
    fb = report["peak_forward_backward"]
    assert abs(plan["peak_forward_backward"] - fb) <= 0.10 * fb
    assert report["activations"] > report["parameters"]  # activations set this peak, not the weights


@pytest.mark.timeout(120)
def test_optimizer_step_peak_agrees(model_dir):
    """Short sequences: the ZeRO-1 update's temporaries (fp32 gradient slices, the all-gather) set the peak."""
    from runtime.dryrun import dry_run, planner_prediction

    config = _config(model_dir, 2, 2, "1f1b", 4, 2, seq=128)
    report = dry_run(config, 4, 0, ranks_per_node=4)
    plan = planner_prediction(config, 4, 0, ranks_per_node=4)
    assert report["peak"] > report["peak_forward_backward"]
    assert plan["peak_optimizer_step"] == plan["peak"]
    assert abs(plan["peak"] - report["peak"]) <= 0.10 * report["peak"]


@pytest.mark.timeout(120)
def test_cli_prints_dry_run_beside_planner(model_dir):
    out = subprocess.run([sys.executable, "-m", "launch", "dryrun", "--set", f"model.path={model_dir}",
                          "--set", "parallel.pp=2", "--set", "parallel.ep=2", "--set", "parallel.microbatches=4",
                          "--set", "train.global_batch=8", "--set", "data.seq_len=256", "--world", "4",
                          "--rank", "0", "--rank", "3"], env=base_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("planner / dry run peak:") == 2, out.stdout
    assert "rank 0 of 4 (pp 0/2" in out.stdout and "rank 3 of 4 (pp 1/2" in out.stdout
    for line in out.stdout.splitlines():
        if line.startswith("planner / dry run peak:"):
            assert 0.9 <= float(line.split()[5]) <= 1.1, line
    assert "optimizer step" in out.stderr  # progress goes to stderr
    bad = subprocess.run([sys.executable, "-m", "launch", "dryrun", "--world", "4", "--rank", "4"], env=base_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "outside a world of 4" in bad.stderr
