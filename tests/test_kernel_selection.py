"""Kernel selection (ops.kernels): Triton on CUDA with no flag, torch on CPU, env and argument overrides, and
a CPU user never importing triton or ops.triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ops import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_auto_picks_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    assert kernels.kernel_backend("cuda:0") == "triton"  # a GPU user needs no flag
    assert kernels.kernel_backend("cpu") == "torch"
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    assert kernels.kernel_backend("cuda:0") == "torch"  # no triton: the torch ops still work on CUDA


def test_env_and_argument_override(monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.kernel_backend("cuda") == "torch"
    assert kernels.kernel_backend("cuda", "triton") == "triton"  # the argument beats the environment
    monkeypatch.setenv(kernels.ENV, "cuda-please")
    with pytest.raises(ValueError, match="MOERUN_KERNELS"):
        kernels.kernel_backend("cuda")
    with pytest.raises(ValueError, match="backend argument"):
        kernels.kernel_backend("cuda", "fast")


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(kernels.ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_autograd_calls_take_the_torch_path(monkeypatch):
    """Triton kernels are forward-only: with grad needed, even a forced backend runs torch (on CPU here a
    forced triton would otherwise raise)."""
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 8, requires_grad=True)
    y = kernels.rms_norm(x, torch.ones(8), backend="triton")
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.timeout(150)
def test_cpu_user_never_imports_triton():
    code = (
        "import sys, torch\n"
        "import ops, ops.kernels as d, ops.paged_attention as pa, ops.fp8_train\n"
        "x = torch.randn(5, 16); w = torch.randn(3, 8, 16)\n"
        "d.rms_norm(x, torch.ones(16)); d.add_rms_norm(x, x, torch.ones(16))\n"
        "d.grouped_linear(x, w, torch.tensor([2, 0, 3]))\n"
        "d.grouped_swiglu(x, w, w, w.transpose(1, 2).contiguous(), torch.tensor([2, 0, 3]))\n"
        "kv = pa.new_kv_pages(4, 16, 8, 4)\n"
        "d.mla_decode_paged(torch.randn(2, 3, 8), torch.randn(2, 3, 4), kv, torch.tensor([[0], [1]], "
        "dtype=torch.int32), torch.tensor([3, 5], dtype=torch.int32), 0.5)\n"
        "q, s = d.quantize_act(x); qw, sw = d.quantize_weight(w[0]); d.fp8_gemm(q, s, qw, sw)\n"
        "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'ops.triton')))\n"
        "print('IMPORTED', bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (kernels.ENV, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout
