"""`moerun plan --calibrate`: a machine measured by local ranks (runtime/calibrate.py) replaces the GPU table in
the planner's cost model (parallel/planner/machine.py). The step-time check against real runs is
bench/calibration.py (docs/tuning.md); here: the cost model charges a measured machine exactly for the
GEMMs of the layer as counted independently from the config, collectives by their measured link, and the
calibration command runs end to end on 2 ranks with plausible figures and a prediction for a job."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from parallel.planner.costmodel import CostModel, Par, Setup
from parallel.planner.machine import Link, MachineProfile
from parallel.planner.models import BUILTIN, with_overrides
from tests.launchers import ROOT, base_env

FAST = 1e9  # GB/s, GFLOPS: "free"


def _profile(gemm_gflops: float, link_latency: float = 0.0, link_gbps: float = FAST) -> MachineProfile:
    links = {k: {"2": Link(link_latency, link_gbps)} for k in ("all_to_all", "all_reduce", "all_gather", "p2p")}
    return MachineProfile(
        name="synthetic", ranks=2, gemm={"float32": [(64, 256, 256, gemm_gflops), (4096, 4096, 4096, gemm_gflops)]},
        attention={"float32": {"fwd": [(128, FAST)], "bwd": [(128, FAST)]}}, mem_gbps=FAST, op_s=0.0, links=links)


def test_measured_machine_charges_the_layers_gemms():
    """With only GEMMs costing anything (1 GFLOPS), a dense layer's forward is its GEMM FLOPs counted from the
    config / 1e9 s, its backward twice that (input and weight gradients), for V2-Lite's MLA without q_lora
    and V3's with it."""
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        m = with_overrides(BUILTIN[name], mtp_layers=0)
        T = 512
        cm = CostModel(m, _profile(1.0).as_gpu(), Setup(seq_len=T, global_batch=1, recipe="moerun", dtype_bytes=4))
        u = cm.layer(False, Par(recompute="none", overlap=False))
        h, H, qk = m.hidden, m.heads, m.qk_nope + m.qk_rope
        q = h * m.q_lora_rank + m.q_lora_rank * H * qk if m.q_lora_rank else h * H * qk
        mats = q + h * (m.kv_lora_rank + m.qk_rope) + m.kv_lora_rank * H * (m.qk_nope + m.v_head) + \
            H * m.v_head * h + 3 * h * m.intermediate
        assert u.f == pytest.approx(2 * T * mats / 1e9, rel=1e-3), name
        assert u.b == pytest.approx(2 * u.f, rel=1e-3), name


def test_measured_links_charge_latency_and_bandwidth():
    """EP: a token goes once to each other rank that holds one of its experts, rows in the model dtype both
    ways, three all-to-alls per dispatch + combine; each pays the measured latency."""
    m = BUILTIN["deepseek-v3"]
    T, lat, gbps = 4096.0, 1e-3, 2.0
    cm = CostModel(m, _profile(FAST, lat, gbps).as_gpu(), Setup(seq_len=4096, recipe="moerun", dtype_bytes=2))
    t, info = cm.ep_alltoall(T, Par(ep=2, recompute="none"))
    touched = 2 * (1 - 0.5 ** m.topk)
    per_token = touched * 0.5 * 2 * 2 * m.hidden
    assert info["ep_bytes_per_token"] == pytest.approx(per_token)
    assert t == pytest.approx(3 * lat + T * per_token / (gbps * 1e9))
    assert Link(lat, gbps).seconds(2e9, calls=2) == pytest.approx(2 * lat + 1.0)


def test_profile_round_trips_and_rejects_junk(tmp_path):
    p = _profile(12.5, 1e-4, 3.0)
    path = tmp_path / "m.json"
    path.write_text(p.to_json())
    assert MachineProfile.load(str(path)) == p
    path.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="not a machine profile"):
        MachineProfile.load(str(path))


@pytest.mark.timeout(240)
def test_calibrate_cli_measures_and_predicts(tmp_path):
    """`moerun plan --calibrate --quick --ranks 2 --job ...`: every figure measured, positive and finite; the
    prediction of a pp=2 job adds up (step = pipeline + sync + optimizer) and carries the framework
    overhead of the ops its dry runs counted."""
    out = subprocess.run([sys.executable, "-m", "launch", "plan", "--calibrate", "--quick", "--ranks", "2", "--json",
                          "--machine-out", str(tmp_path / "m.json"), "--set", "parallel.pp=2",
                          "--set", "train.global_batch=4", "--set", "data.seq_len=32", "--set",
                          "parallel.microbatches=4"], env=base_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=230)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    mach = MachineProfile.from_dict(doc["machine"])
    assert MachineProfile.load(str(tmp_path / "m.json")) == mach
    assert mach.notes["quick"] is True  # a quick profile says so
    rates = [r[3] for r in mach.gemm["float32"]] + [g for rows in mach.attention["float32"].values() for _, g in rows]
    assert all(0 < x < 1e5 and math.isfinite(x) for x in rates), rates
    assert 0 < mach.mem_gbps < 1e4 and 0 < mach.op_s < 1e-2
    for kind in ("all_to_all", "all_reduce", "all_gather", "p2p"):
        link = mach.link(kind, 2)
        assert link.latency_s >= 0 and link.gbps > 0, (kind, link)
    p = doc["prediction"]
    assert p["step_time_s"] == pytest.approx(p["makespan_s"] + p["dp_sync_s"] + p["optimizer_s"], rel=1e-6)
    assert p["overhead_ms"]["forward"] > 0 and p["overhead_ms"]["backward"] > 0
    assert len(p["ops"]) == 2 and all(o["ops_forward"] > 0 for o in p["ops"])  # one dry run per pp rank


@pytest.mark.parametrize("args", [["--quick"], ["--quick", "--machine", "m.json"]])
def test_quick_without_calibrate_is_refused(args, tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch", "plan", *args], env=base_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--quick applies to --calibrate" in out.stderr, (out.returncode, out.stderr)
