"""Every Triton kernel compiles for an H100 (sm_90) ahead of time, with no GPU: Triton lowers it to PTX and
runs the bundled ptxas. The interpreter tests (test_triton_kernels.py) check the numbers; this catches what
only the compiler rejects (loop-carried type changes, dot shapes, fp8 operand rules, shared memory).

Runs in a child process without TRITON_INTERPRET (the kernels must be real JIT functions), bf16 inputs
(the production dtype) at DeepSeek-V3 sizes where a size is a compile-time constant (r = 512, rope 64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _i32(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def _const(**values) -> tuple[dict[str, str], dict]:
    return dict.fromkeys(values, "constexpr"), values


def _cases():
    from ops.triton import fp8, grouped_gemm, mla_decode, rmsnorm

    cases = {}
    sig = {k: "*bf16" for k in ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr")}
    sig |= _i32("stride_x", "stride_r", "stride_y", "stride_s", "n_cols") | {"eps": "fp32"}
    c, v = _const(HAS_RESIDUAL=True, BLOCK=8192)
    cases["rmsnorm"] = (rmsnorm._rmsnorm_kernel, sig | c, v, {"num_warps": 16})

    sig = {"q_ptr": "*bf16", "qpe_ptr": "*bf16", "kv_ptr": "*bf16", "bt_ptr": "*i32", "len_ptr": "*i32",
           "o_ptr": "*fp32", "lse_ptr": "*fp32", "scale": "fp32"}
    sig |= _i32("s_qb", "s_qh", "s_pb", "s_ph", "s_btb", "s_ob", "s_oh", "s_os", "s_lb", "s_lh", "H", "R", "DR",
                "page_size", "width", "chunk")
    c, v = _const(BLOCK_H=16, BLOCK_N=32, BLOCK_R=512, BLOCK_DR=64, PRECISION="tf32")
    cases["mla_decode_split"] = (mla_decode._split_kernel, sig | c, v, {})
    sig = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}
    sig |= _i32("n_splits", "R", "s_ob", "s_oh", "s_os", "s_lb", "s_lh", "s_outb", "s_outh")
    c, v = _const(BLOCK_R=512, BLOCK_S=mla_decode.MAX_SPLITS)
    cases["mla_decode_reduce"] = (mla_decode._reduce_kernel, sig | c, v, {})

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16", "tile_expert_ptr": "*i32",
           "tile_row_ptr": "*i32", "tile_end_ptr": "*i32"}
    sig |= _i32("N", "K", "s_xm", "s_we", "s_wn", "s_ym")
    for swiglu in (False, True):
        c, v = _const(SWIGLU=swiglu, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, PRECISION="tf32")
        cases[f"grouped_gemm_swiglu_{swiglu}"] = (grouped_gemm._grouped_kernel, sig | c, v, {})

    sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"} | _i32("M", "K", "s_xm", "s_qm", "s_sm")
    for block_m in (1, 128):
        c, v = _const(BLOCK_M=block_m, BLOCK_K=128, SOFT_ROUND=False)
        cases[f"fp8_quant_{block_m}x128"] = (fp8._quant_kernel, sig | c, v, {})
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16"}
    sig |= _i32("M", "N", "K", "s_am", "s_asm", "s_bn", "s_bsn", "s_cm")
    c, v = _const(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128)
    cases["fp8_gemm"] = (fp8._gemm_kernel, sig | c, v, {})
    return cases


CASE_NAMES = [
    "rmsnorm", "mla_decode_split", "mla_decode_reduce", "grouped_gemm_swiglu_False", "grouped_gemm_swiglu_True",
    "fp8_quant_1x128", "fp8_quant_128x128", "fp8_gemm",
]


def _compile_all() -> dict[str, str | None]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    out: dict[str, str | None] = {}
    for name, (fn, sig, consts, opts) in _cases().items():
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
            out[name] = None
        except Exception:  # reported per case
            out[name] = traceback.format_exc(limit=3)[-3000:]
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, str | None]:
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"triton's bundled ptxas not found at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOERUN_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"compile run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_kernel_compiles_for_sm90(compiled, case):
    assert case in compiled, f"no such case {case}; ran {sorted(compiled)}"
    assert compiled[case] is None, f"{case}:\n{compiled[case]}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_compile_all()))
