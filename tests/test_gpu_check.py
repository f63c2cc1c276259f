"""tools/gpu_check.py (`make gpu-check`): skips cleanly without a GPU (what CI runs), reports one verdict line
per check, and its checks' own code runs on CPU under the Triton interpreter, so that the tool does not rot
between the rare runs on a GPU. The GPU run itself is unverified on hardware (docs/pipeline.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOERUN_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run `make gpu-check` itself")
def test_skips_cleanly_without_a_gpu() -> None:
    res = subprocess.run([sys.executable, str(TOOL)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [res.stdout.strip()], res.stdout  # one line
    assert res.stdout.startswith("gpu-check: SKIP: no CUDA device (torch "), res.stdout


def test_one_verdict_line_per_check_and_the_exit_code() -> None:
    sys.path.insert(0, str(TOOL.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(TOOL.parent))

    def bad() -> str:
        raise gpu_check.CheckFailed("loss did not fall:\n  1.0 -> 1.0")

    def crash() -> str:
        raise KeyError("ids")

    lines: list[str] = []
    rc = gpu_check.run_checks({"good": lambda: "fine", "bad": bad, "crash": crash}, out=lines.append)
    assert rc == 1 and len(lines) == 3
    assert lines[0].startswith("gpu-check: PASS good: fine [")
    assert lines[1].startswith("gpu-check: FAIL bad: loss did not fall: 1.0 -> 1.0 [")
    assert lines[2].startswith("gpu-check: FAIL crash: KeyError: 'ids' [")
    assert gpu_check.run_checks({"good": lambda: "fine"}, out=lines.append) == 0
    assert set(gpu_check.CHECKS) >= {"model", "bf16-train", "serve", "triton-fp8"}


@pytest.mark.timeout(240)
def test_checks_run_under_the_triton_interpreter() -> None:
    """The model and Triton checks on CPU (device "cpu", fp16 for the interpreter's sake): every one PASSes,
    so their code, imports and tolerances hold; compiling for a GPU is what only `make gpu-check` does."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tools'); import gpu_check as g; g.DEVICE = 'cpu'; g.LOW = 'float16'; "
            "sys.exit(g.run_checks({k: f for k, f in g.CHECKS.items() if k == 'model' or k.startswith('triton')}))")
    res = subprocess.run([sys.executable, "-c", code], env=_env(TRITON_INTERPRET="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=220)
    lines = res.stdout.splitlines()
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert len(lines) == 6 and all(line.startswith("gpu-check: PASS ") for line in lines), res.stdout
