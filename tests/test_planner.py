"""Layout planner: model shapes, cost model, stage balancing, simulator extrapolation, search, `moerun plan`."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from launch.cli import main as cli_main
from parallel.planner.costmodel import CostModel, Par, Setup, param_counts
from parallel.planner.hardware import (
    CUTLASS36_DENSE,
    DEEPGEMM_DENSE,
    DEEPGEMM_DENSE_SPEEDUP,
    DEEPGEMM_GROUPED,
    DEEPGEMM_GROUPED_SPEEDUP,
    fp8_gemm_tflops,
    get_gpu,
)
from parallel.planner.models import BUILTIN, from_hf_config, load_model, with_overrides
from parallel.planner.pipeline_time import pipeline_time
from parallel.planner.search import Candidate, Planner, parse_layout, partition, ramp_seconds, rank_stages

V3 = BUILTIN["deepseek-v3"]
H800 = get_gpu("h800")

# Published sizes (model cards / papers): total and activated parameters, main model without MTP.
PUBLISHED = {"deepseek-v3": (671e9, 37e9), "deepseek-v2": (236e9, 21e9), "deepseek-v2-lite": (15.7e9, 2.4e9),
             "kimi-k2": (1.04e12, 32e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_sizes(name):
    pc = param_counts(BUILTIN[name])
    total, active = PUBLISHED[name]
    assert pc["total"] == pytest.approx(total, rel=0.02)
    assert pc["active"] == pytest.approx(active, rel=0.12)  # "activated" conventions differ on embeddings


def test_hf_config_round_trip(tmp_path):
    cfg = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
           "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
           "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "vocab_size": 129280,
           "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(tmp_path))
    for f in ("hidden", "layers", "dense_layers", "heads", "q_lora_rank", "n_routed", "topk", "n_group",
              "topk_group", "vocab", "mtp_layers", "moe_intermediate", "intermediate"):
        assert getattr(spec, f) == getattr(V3, f), f
    with pytest.raises(ValueError, match="kv_lora_rank"):
        from_hf_config({k: v for k, v in cfg.items() if k != "kv_lora_rank"})
    with pytest.raises(ValueError, match="neither built in"):
        load_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown gpu"):
        get_gpu("a100")


def test_cost_model_directions():
    cm = CostModel(V3, H800)
    base = Par(tp=1, ep=64, mbs=1, recompute="selective", overlap=True)
    moe = cm.layer(True, base)
    # recompute trades memory for time
    full = cm.layer(True, Par(tp=1, ep=64, mbs=1, recompute="full", overlap=True))
    none = cm.layer(True, Par(tp=1, ep=64, mbs=1, recompute="none", overlap=True))
    assert full.act_bytes < moe.act_bytes < none.act_bytes
    assert full.b > moe.b > none.b
    # more EP ranks hold fewer experts; TP splits attention
    assert cm.layer(True, Par(tp=1, ep=128)).params_expert == pytest.approx(moe.params_expert / 2)
    assert cm.layer(True, Par(tp=2, ep=64)).params_dense < moe.params_dense
    # FP8 GEMMs are faster than BF16 ones; giving SMs to communication slows compute
    bf16 = CostModel(V3, H800, Setup(precision="bf16")).layer(True, base)
    assert bf16.f > moe.f
    assert cm.layer(True, Par(tp=1, ep=64, overlap=False)).f < moe.f
    # DeepGEMM figures: smaller M runs at lower throughput
    assert fp8_gemm_tflops(H800, 128, 4096, 7168) < fp8_gemm_tflops(H800, 4096, 4096, 7168)


def test_fp8_gemm_kernels_cutlass36_is_deepgemm_over_speedup():
    """The default FP8 kernels are DeepGEMM README's baseline (its internal CUTLASS 3.6-based implementation):
    DeepGEMM's TFLOPS / the README's speedup, at every measured shape, and M interpolates on those rows."""
    # figures read off the README by hand, not from the module's tables
    assert fp8_gemm_tflops(H800, 4096, 7168, 16384) == pytest.approx(1358 / 1.2)
    assert fp8_gemm_tflops(H800, 4096, 7168, 16384, kernels="deepgemm") == pytest.approx(1358)
    assert fp8_gemm_tflops(H800, 8192, 4096, 7168, grouped=True) == pytest.approx(1297 / 1.2)
    assert fp8_gemm_tflops(H800, 8192, 7168, 2048, grouped=True) == pytest.approx(1099 / 1.2)
    assert fp8_gemm_tflops(H800, 128, 4096, 7168) == pytest.approx(533 / 2.0)
    assert fp8_gemm_tflops(H800, 128, 4096, 7168, kernels="deepgemm") == pytest.approx(533)
    assert fp8_gemm_tflops(H800, 64, 2112, 7168) == pytest.approx(206 / 2.7)
    assert fp8_gemm_tflops(H800, 4096, 32768, 512) == pytest.approx(590 / 1.0)
    for nk, row in DEEPGEMM_DENSE.items():
        assert set(row) == set(DEEPGEMM_DENSE_SPEEDUP[nk]) == set(CUTLASS36_DENSE[nk])
        for m, tf in row.items():
            assert fp8_gemm_tflops(H800, m, *nk) == pytest.approx(tf / DEEPGEMM_DENSE_SPEEDUP[nk][m])
            assert fp8_gemm_tflops(H800, m, *nk, kernels="deepgemm") == pytest.approx(tf)
    for nk, tf in DEEPGEMM_GROUPED.items():
        assert fp8_gemm_tflops(H800, 8192, *nk, grouped=True) == pytest.approx(tf / DEEPGEMM_GROUPED_SPEEDUP[nk])
    # between measured M the baseline's own rows are interpolated (not DeepGEMM's rows / the M=4096 speedup):
    # (4096, 7168) at M=1024, log-linear between 128 (266.5) and 4096 (1185.45): t = log(8) / log(32) = 0.6
    assert fp8_gemm_tflops(H800, 1024, 4096, 7168) == pytest.approx(533 / 2.0 + 0.6 * (1304 / 1.1 - 533 / 2.0))
    # never faster than DeepGEMM; BF16 GEMMs do not depend on the FP8 kernels
    for m in (64, 100, 128, 1000, 4096, 20000):
        for nk in DEEPGEMM_DENSE:
            assert fp8_gemm_tflops(H800, m, *nk) <= fp8_gemm_tflops(H800, m, *nk, kernels="deepgemm") + 1e-9
    par = Par(tp=1, ep=64)
    a, b = CostModel(V3, H800, Setup(kernels_of="2024-12")), CostModel(V3, H800, Setup(kernels_of="2025-02"))
    assert a.head(par).f == pytest.approx(b.head(par).f)
    assert a.layer(True, par).f > b.layer(True, par).f
    bf_a = CostModel(V3, H800, Setup(precision="bf16", kernels_of="2024-12")).layer(True, par)
    bf_b = CostModel(V3, H800, Setup(precision="bf16", kernels_of="2025-02")).layer(True, par)
    assert bf_a.f == pytest.approx(bf_b.f) and bf_a.b == pytest.approx(bf_b.b)
    # unknown kernels: a clear error naming the valid values
    with pytest.raises(ValueError, match="cutlass36, deepgemm"):
        fp8_gemm_tflops(H800, 4096, 4096, 7168, kernels="cublas")
    with pytest.raises(ValueError, match="YYYY-MM"):
        Setup(kernels_of="2024")


def test_selective_recompute_pays_norms_and_swiglu():
    """V3 3.2.3 and 3.3.3: selective recompute re-runs every RMSNorm, the MLA up-projections and the MoE SwiGLU output;
    its backward costs more than keeping everything by at least those GEMMs and element-wise passes."""
    cm = CostModel(V3, H800)
    sel = cm.layer(True, Par(tp=1, ep=64, recompute="selective"))
    none = cm.layer(True, Par(tp=1, ep=64, recompute="none"))
    T = 4096.0
    up = cm._gemm(T, V3.heads * 192, V3.q_lora_rank, Par()) + cm._gemm(T, V3.heads * 256, V3.kv_lora_rank, Par())
    rows = T * V3.topk
    elementwise = cm._mem(2 * T * 3 * V3.hidden + 3 * (rows + T) * V3.moe_intermediate, Par())
    assert sel.b - none.b == pytest.approx(up + elementwise, rel=1e-6)
    assert sel.f == pytest.approx(none.f)


def test_batch_ramp_matches_step_by_step_reference():
    """The closed form against a plain loop over optimizer steps with the batch read off the linear ramp."""
    s = Setup(seq_len=4096, global_batch=15360, batch_ramp_start=3072, batch_ramp_tokens=469e9)
    step, per_seq, tokens = 16.5, 0.00092, 1e12
    t, x = 0.0, 0.0
    while x < tokens:
        b = s.global_batch if x >= s.batch_ramp_tokens else \
            s.batch_ramp_start + (s.global_batch - s.batch_ramp_start) * x / s.batch_ramp_tokens
        b = max(1, round(b))
        t += step - per_seq * (s.global_batch - b)
        x += b * s.seq_len
    assert ramp_seconds(step, per_seq, s, tokens) == pytest.approx(t, rel=2e-3)
    flat = Setup(batch_ramp_tokens=0)
    steady = step * tokens / (15360 * 4096)
    assert ramp_seconds(step, per_seq, flat, tokens) == pytest.approx(steady)
    # the ramp costs extra only through the per-step fixed part, and is diluted over longer runs
    assert ramp_seconds(step, step / 15360, s, tokens) == pytest.approx(steady)
    extra_1t = ramp_seconds(step, per_seq, s, 1e12) / steady - 1
    extra_15t = ramp_seconds(step, per_seq, s, 14.8e12) / (14.8 * steady) - 1
    assert extra_1t > 0.01 and 0 < extra_15t < extra_1t / 10


def test_node_limited_routing_bounds_infiniband_copies():
    cm = CostModel(V3, H800)
    t64, info64 = cm.ep_alltoall(4096, Par(ep=64))
    assert info64["ep_internode"] and 0 < info64["ep_copies_per_token"] <= V3.topk_group
    t8, info8 = cm.ep_alltoall(4096, Par(ep=8))
    assert not info8["ep_internode"] and t8 < t64
    # without group-limited routing the same EP group sends more copies across nodes
    free = CostModel(BUILTIN["deepseek-v3"].__class__(**{**V3.__dict__, "n_group": 1, "topk_group": 1}), H800)
    assert free.ep_alltoall(4096, Par(ep=64))[1]["ep_copies_per_token"] > info64["ep_copies_per_token"]


@pytest.mark.parametrize("kind,pp", [("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 2)])
def test_extrapolated_pipeline_time_matches_full_simulation(kind, pp):
    args = dict(f=1.0, b=2.3, w=0.8, fb=3.0 if kind.startswith("dual") else None, comm=0.05, a2a_f=0.7, a2a_b=0.7)
    chunks = 40
    fast = pipeline_time(kind, pp, chunks, **args)
    exact = pipeline_time(kind, pp, chunks, exact=True, **args)
    assert fast.simulated_chunks != exact.simulated_chunks  # really extrapolated
    assert fast.makespan == pytest.approx(exact.makespan, rel=0.01)
    assert fast.bubble == pytest.approx(exact.bubble, rel=0.05, abs=0.05)
    # the simulator is linear in its costs
    scaled = pipeline_time(kind, pp, chunks, **{k: (v * 3 if v is not None else None) for k, v in args.items()})
    assert scaled.makespan == pytest.approx(3 * fast.makespan, rel=1e-6)


@pytest.mark.parametrize("kind,pp", [("1f1b", 8), ("dualpipe", 8), ("dualpipev", 4)])
def test_partition_balances_ranks(kind, pp):
    counts = partition(0.1, 4.2, 1.0, 61, kind, pp)
    n_stages = 2 * pp if kind == "dualpipev" else pp
    assert len(counts) == n_stages and sum(counts) == 61
    extra = [0.1] + [0.0] * (n_stages - 2) + [4.2]
    loads = [sum(counts[s] + extra[s] for s in ss) for ss in rank_stages(kind, pp)]
    assert max(loads) - min(loads) <= 1.0 + 4.2  # within one layer, unless the tail alone is heavier
    assert max(loads) <= (61 + 4.3) * len(rank_stages(kind, pp)[0]) / n_stages + 1.0
    assert counts[-1] < max(counts)  # the stage with head + MTP gets fewer layers


def test_deepseek_v3_layout_and_search():
    planner = Planner(V3, H800, nodes=256, gpus_per_node=8)
    ev = planner.evaluate(Candidate(tp=1, pp=16, ep=64, dp=128, schedule="dualpipe", mbs=1, recompute="selective"))
    d = ev.as_dict(planner.world, planner.s, V3, H800, 1e12)
    assert ev.microbatches == 15360 // 128
    assert d["fits"] and d["memory_gb_per_gpu"] <= 80
    assert 0 < d["bubble_fraction"] < 0.3
    tok_step = 15360 * 4096
    assert d["gpu_hours_per_trillion_tokens"] == pytest.approx(2048 * ev.step_time_s / 3600 * 1e12 / tok_step,
                                                               rel=1e-3)
    # the per-sequence slope is the DualPipe F&B pace of the bottleneck rank, spread over dp sequences
    assert ev.per_sequence_s * 128 == pytest.approx(ev.costs["fb"], rel=0.05)
    assert d["gpu_hours_per_trillion_tokens_avg"] > d["gpu_hours_per_trillion_tokens"]  # the batch ramp
    # DualPipe keeps two copies of a rank's stages; 1F1B one
    one = planner.evaluate(Candidate(1, 16, 64, 128, "1f1b", 1, "selective"))
    assert ev.memory["weights"] > 1.5 * one.memory["weights"]
    # exposed all-to-all: the non-overlapping schedule is slower per micro-batch
    assert one.step_time_s > ev.step_time_s
    res = planner.search({"pp": 16, "ep": 64, "tp": 1}, top=3)
    assert res["evaluations"][0].step_time_s <= ev.step_time_s + 1e-9
    best = planner.search(top=3)["evaluations"][0]
    assert best.fits and best.step_time_s <= ev.step_time_s + 1e-9


def test_layout_errors():
    planner = Planner(V3, H800, nodes=2, gpus_per_node=8)
    with pytest.raises(ValueError, match="ep=3"):
        planner.evaluate(Candidate(1, 1, 3, 16, "1f1b", 1, "selective"))
    with pytest.raises(ValueError, match="tp\\*pp\\*dp"):
        planner.evaluate(Candidate(1, 2, 8, 16, "1f1b", 1, "selective"))
    with pytest.raises(ValueError, match="unknown"):
        parse_layout("pp=2,foo=3")
    with pytest.raises(ValueError, match="expected int"):
        parse_layout("pp=two")


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_json_fields():
    rc, out, _ = _run_cli(["plan", "--model", "deepseek-v2-lite", "--nodes", "2", "--gpus-per-node", "8",
                           "--gpu", "h100", "--global-batch", "512", "--json", "--top", "3"])
    assert rc == 0
    doc = json.loads(out)
    keys = {"tp", "pp", "ep", "dp", "schedule", "microbatches", "memory_gb_per_gpu", "step_time_s", "tokens_per_s",
            "mfu", "bubble_fraction", "gpu_hours_per_trillion_tokens"}
    assert doc["layouts"] and all(keys <= set(r) for r in doc["layouts"])
    assert doc["best"] == doc["layouts"][0] and doc["best"]["fits"]
    # the default ramp starts at 3072 sequences, above this batch of 512: no ramp; an explicit one costs more
    flat = doc["best"]
    assert flat["gpu_hours_per_trillion_tokens_avg"] == pytest.approx(flat["gpu_hours_per_trillion_tokens"],
                                                                      rel=1e-3)
    rc, out2, _ = _run_cli(["plan", "--model", "deepseek-v2-lite", "--nodes", "2", "--gpus-per-node", "8",
                            "--gpu", "h100", "--global-batch", "512", "--json", "--top", "3",
                            "--batch-ramp", "128,469B"])
    ramped = json.loads(out2)["best"]
    assert rc == 0 and ramped["gpu_hours_per_trillion_tokens_avg"] > flat["gpu_hours_per_trillion_tokens_avg"]
    times = [r["step_time_s"] for r in doc["layouts"]]
    assert times == sorted(times)


V3_CHECK = ["plan", "--model", "deepseek-v3", "--nodes", "256", "--gpus-per-node", "8", "--gpu", "h800",
            "--layout", "pp=16,ep=64,tp=1", "--json"]


def test_cli_deepseek_v3_check_against_published_cost():
    """The report's layout on 2048 H800 with the kernels of the report's date (2024-12: CUTLASS 3.6-based FP8
    GEMMs, DeepGEMM not yet released; FlashAttention-3) lands within 15% of the published 180K GPU-hours per
    trillion tokens and fits in 80 GB; today's kernels (DeepGEMM) predict strictly fewer GPU-hours."""
    rc, out, _ = _run_cli(V3_CHECK + ["--kernels-of", "2024-12"])
    assert rc == 0
    doc = json.loads(out)
    assert doc["setup"]["kernels"] == {"fp8_gemm": "cutlass36", "attention": "fa3"}
    best = doc["best"]
    assert (best["tp"], best["pp"], best["ep"], best["dp"]) == (1, 16, 64, 128)
    assert best["fits"] and best["memory_gb_per_gpu"] <= 80
    assert best["gpu_hours_per_trillion_tokens"] == pytest.approx(180_000, rel=0.15)
    rc, out, _ = _run_cli(V3_CHECK)
    assert rc == 0
    fast = json.loads(out)
    assert fast["setup"]["kernels"] == {"fp8_gemm": "deepgemm", "attention": "fa3"}
    fb = fast["best"]
    assert fb["fits"] and (fb["tp"], fb["pp"], fb["ep"], fb["dp"]) == (1, 16, 64, 128)
    assert fb["gpu_hours_per_trillion_tokens"] < best["gpu_hours_per_trillion_tokens"]
    assert fb["step_time_s"] < best["step_time_s"]
    # same layout, same memory: only the FP8 GEMM time changed
    assert fb["memory_gb_per_gpu"] == pytest.approx(best["memory_gb_per_gpu"])


def test_cli_errors_and_table():
    rc, _, err = _run_cli(["plan", "--model", "gpt-9", "--nodes", "1"])
    assert rc == 2 and "neither built in" in err
    rc, _, err = _run_cli(["plan", "--model", "deepseek-v3", "--nodes", "1", "--layout", "pp=2,zz=1"])
    assert rc == 2 and "zz" in err
    rc, _, err = _run_cli(["plan", "--model", "deepseek-v3", "--nodes", "1", "--batch-ramp", "3072"])
    assert rc == 2 and "--batch-ramp" in err
    rc, _, err = _run_cli(["plan", "--model", "deepseek-v3", "--nodes", "2", "--layout", "pp=2,ep=3"])
    assert rc == 1 and "ep=3 must divide" in err
    rc, out, _ = _run_cli(["plan", "--model", "deepseek-v2-lite", "--nodes", "1", "--gpu", "h200",
                           "--global-batch", "256", "--top", "2"])
    assert rc == 0 and "best:" in out and "GPU-h/1T" in out and "kernels of latest: deepgemm, fa3" in out
    rc, _, err = _run_cli(["plan", "--model", "deepseek-v3", "--nodes", "1", "--kernels-of", "2024"])
    assert rc == 2 and "YYYY-MM" in err


def test_cli_experts(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "load.npy"
    np.save(path, rng.lognormal(0, 1.5, size=(3, 64)))
    placement = tmp_path / "p.json"
    rc, out, _ = _run_cli(["plan", "experts", "--load", str(path), "--gpus", "8", "--nodes", "2",
                           "--redundant", "8", "--groups", "4", "--json", "--out", str(placement)])
    assert rc == 0
    doc = json.loads(out)
    assert len(doc["layers"]) == 3 and json.loads(placement.read_text()) == doc
    for layer in doc["layers"]:
        assert layer["max_over_mean_after"] < layer["max_over_mean_before"]
        assert sum(len(s) for s in layer["slots"]) == 64 + 8
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    rc, _, err = _run_cli(["plan", "experts", "--load", str(bad), "--gpus", "8"])
    assert rc == 2 and "cannot read" in err


def test_plan_imports_no_torch():
    code = ("import sys; from launch.cli import main; "
            "rc = main(['plan', '--model', 'deepseek-v2-lite', '--nodes', '1', '--global-batch', '64', '--top', '1',"
            " '--json']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_layout_filter_lists_every_matching_layout(capsys):
    """docs/tuning.md: with --layout "every matching layout is listed", not the first 10 of them."""
    import json

    from launch.cli import main

    argv = ["plan", "--model", "deepseek-v3", "--nodes", "256", "--gpus-per-node", "8", "--gpu", "h800",
            "--layout", "pp=16,ep=64,tp=1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] > 10 and len(out["layouts"]) == out["candidates"]
    assert all((r["pp"], r["ep"], r["tp"]) == (16, 64, 1) for r in out["layouts"])
    assert main([*argv, "--top", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layouts"]) == 3
    assert main(argv[:-3] + ["--json"]) == 0  # no --layout: the best 10
    assert len(json.loads(capsys.readouterr().out)["layouts"]) == 10


def test_plan_prints_the_train_flags_of_its_layout(capsys):
    """The recommended layout comes with the `moerun train` flags (and TOML) that run it: the job config they
    make holds the layout, its micro-batches and the batch the planner assumed."""
    import tomllib

    from launch.cli import main
    from runtime.jobconfig import load_config

    argv = ["plan", "--model", "deepseek-v3", "--nodes", "256", "--gpus-per-node", "8", "--gpu", "h800",
            "--layout", "pp=16,ep=64,tp=1", "--top", "1"]
    assert main([*argv, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    items = best["train_flags"].split()
    assert items[::2] == ["--set"] * (len(items) // 2)
    cfg = load_config(None, items[1::2])
    par = cfg["parallel"]
    assert (par["tp"], par["pp"], par["ep"], par["dp"]) == (best["tp"], best["pp"], best["ep"], best["dp"])
    assert par["schedule"] == best["schedule"] and par["microbatches"] == best["microbatches"]
    assert cfg["train"]["global_batch"] == 15360 and cfg["data"]["seq_len"] == 4096 and cfg["train"]["fp8"]
    assert par["tp"] * par["pp"] * par["dp"] == 2048
    assert main([*argv, "--toml"]) == 0
    toml = tomllib.loads(capsys.readouterr().out)
    assert toml["parallel"] == {k: par[k] for k in toml["parallel"]} and toml["train"]["global_batch"] == 15360
    assert main(argv) == 0
    assert f"moerun launch -n 2048 -- train JOB.toml {best['train_flags']}" in capsys.readouterr().out


def test_published_runs_differ_only_in_stated_inputs():
    """One cost model: V2's run and V3's differ by inputs that are facts of each run. The kernels of a date
    are the newest released by then; FlashAttention-2 (before 2024-07) runs at 35% of peak ([FA3]'s abstract);
    device-limited routing (V2: 3 of 8 groups at EP8, one group per GPU) bounds the GPUs a token reaches;
    token dropping caps the routed rows at the capacity."""
    from parallel.planner.hardware import ATTENTION_EFFICIENCY, kernels_of

    assert kernels_of("2024-05") == {"fp8_gemm": "cutlass36", "attention": "fa2"}
    assert kernels_of("2024-12") == {"fp8_gemm": "cutlass36", "attention": "fa3"}
    assert kernels_of("2025-03") == kernels_of("latest") == {"fp8_gemm": "deepgemm", "attention": "fa3"}
    assert ATTENTION_EFFICIENCY["fa2"][0] == 0.35
    v2 = BUILTIN["deepseek-v2"]
    old = CostModel(v2, H800, Setup(precision="bf16", kernels_of="2024-05"))
    new = CostModel(v2, H800, Setup(precision="bf16", kernels_of="2024-12"))
    assert old._attn_core(4096, Par())[0] == pytest.approx(new._attn_core(4096, Par())[0] * 0.585 / 0.35, rel=0.01)
    limited = old.ep_alltoall(4096, Par(ep=8))[1]["ep_copies_per_token"]
    free = CostModel(with_overrides(v2, topk_group=8), H800, Setup(precision="bf16")).ep_alltoall(
        4096, Par(ep=8))[1]["ep_copies_per_token"]
    assert limited == pytest.approx(3 * (1 - (2 / 3) ** 6) * 7 / 8)
    assert free == pytest.approx(8 * (1 - (7 / 8) ** 6) * 7 / 8)
    skewed = Setup(precision="bf16", load_imbalance=1.3)
    dropped = Setup(precision="bf16", load_imbalance=1.3, capacity_factor=1.0)
    assert (skewed.routed_load, dropped.routed_load) == (1.3, 1.0)
    assert CostModel(v2, H800, dropped).layer(True, Par(ep=8)).f < CostModel(v2, H800, skewed).layer(True, Par(ep=8)).f
