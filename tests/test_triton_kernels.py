"""Every Triton kernel against its torch twin, under Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter must be switched on before `triton` is first imported (triton decides at decoration time),
and torch imports triton on its own in a test session (torch._dynamo), so the cases run in one child
process started with the variable set: `python tests/test_triton_kernels.py` prints one JSON line of
{case: null | error}. Each pytest test below asserts one case of that run.

Tolerances (max abs error against the torch twin computed in fp32 on the same inputs, inputs of unit scale):
  MLA decode     fp32 1e-5                    fp16 3e-3   (fp16 P.V product, fp32 softmax/accumulation)
  grouped GEMM   fp32 1e-5 (rel 1e-5)         fp16 1e-2 abs + 1e-2 rel (fp16 output rounding)
  RMSNorm        fp32 1e-6 rel                fp16 exact vs the torch op in fp16 (same rounding order)
  FP8 quantize   bit-exact float8_e4m3fn values and exactly equal fp32 scales
  FP8 GEMM       rel 1e-5 of max |C| (fp32 sums in a different order than one dequantized fp32 GEMM)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
R, DR = 32, 8


# --- cases (run in the child) ------------------------------------------------------------------------------
def _paged(lens, page_size, dtype, seed):
    from test_triton_paged_cache import _paged_batch

    kv, table, seq_lens, _ = _paged_batch(lens, page_size, dtype, seed)
    return kv, table, seq_lens


def _decode(page_size: int, dtype: torch.dtype) -> None:
    from ops.paged_attention import mla_decode_paged as ref_fn
    from ops.triton.mla_decode import mla_decode_paged

    lens = [1, 70, 0, 33]  # ragged, an empty sequence, several pages
    kv, table, seq_lens = _paged(lens, page_size, dtype, seed=page_size)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 5, R, generator=g).to(dtype)  # 5 heads: not a multiple of the 16-head block
    qpe = torch.randn(4, 5, DR, generator=g).to(dtype)
    ref = ref_fn(q.float(), qpe.float(), kv.float(), table, seq_lens, 0.2)
    assert ref.abs().max() > 0.1
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    for splits in (1, 3):  # one split, and several joined by the log-sum-exp reduction
        out = mla_decode_paged(q, qpe, kv, table, seq_lens, 0.2, num_splits=splits)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # A caller-given max_seq_len (no host read of seq_lens) gives the same result.
    out = mla_decode_paged(q, qpe, kv, table, seq_lens, 0.2, max_seq_len=80)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)


def _decode_odd_page() -> None:
    from ops.paged_attention import mla_decode_paged as ref_fn
    from ops.triton.mla_decode import mla_decode_paged

    kv, table, seq_lens = _paged([19, 7], 5, torch.float32, seed=3)  # page 5 does not divide the 16-token tile
    q, qpe = torch.randn(2, 3, R), torch.randn(2, 3, DR)
    ref = ref_fn(q, qpe, kv, table, seq_lens, 0.3)
    out = mla_decode_paged(q, qpe, kv, table, seq_lens, 0.3, num_splits=2, block_n=16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _experts(dtype, k=40, n=24, counts=(0, 7, 0, 20, 3)):
    g = torch.Generator().manual_seed(5)
    e = len(counts)
    m = sum(counts)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = [(torch.randn(e, n, k, generator=g) / 6).to(dtype) for _ in range(2)]
    down = (torch.randn(e, k, n, generator=g) / 4).to(dtype)
    return x, w[0], w[1], down, torch.tensor(counts)


def _grouped_linear(dtype: torch.dtype, default_blocks: bool) -> None:
    from ops.moe import grouped_linear as ref_fn
    from ops.triton.grouped_gemm import grouped_linear

    # uneven loads with empty experts (first, middle and last); K = 40 is not a multiple of BLOCK_K
    x, w, _, _, counts = _experts(dtype, counts=(0, 7, 0, 20, 3, 0))
    blocks = {} if default_blocks else {"block_m": 16, "block_n": 16, "block_k": 16}
    y = grouped_linear(x, w, counts, **blocks)
    ref = ref_fn(x.float(), w.float(), counts, force_loop=True)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2)}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=tol[0], atol=tol[1])


def _grouped_swiglu(dtype: torch.dtype) -> None:
    from ops.moe import grouped_swiglu as ref_fn
    from ops.triton.grouped_gemm import grouped_swiglu

    x, gate, up, down, counts = _experts(dtype, counts=(3, 0, 17, 0, 1))
    y = grouped_swiglu(x, gate, up, down, counts, block_m=16, block_n=16, block_k=16)
    ref = ref_fn(x.float(), gate.float(), up.float(), down.float(), counts, force_loop=True)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2)}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol[0], atol=tol[1])


def _grouped_all_empty_but_one() -> None:
    from ops.triton.grouped_gemm import grouped_linear, tile_schedule

    x, w, _, _, counts = _experts(torch.float32, counts=(0, 0, 0, 5, 0))
    torch.testing.assert_close(grouped_linear(x, w, counts, block_m=16, block_n=16, block_k=16), x @ w[3].T)
    te, first, end = tile_schedule(torch.tensor([0, 33, 0, 16]), 49, 16)
    real = te >= 0
    assert te[real].tolist() == [1, 1, 1, 3] and first[real].tolist() == [0, 16, 32, 33]
    assert end[real].tolist() == [33, 33, 33, 49]


def _rmsnorm(dtype: torch.dtype) -> None:
    from ops.norm import rms_norm as ref_fn
    from ops.triton.rmsnorm import rms_norm

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 100, generator=g).to(dtype)  # 100: not a power of two
    w = (1 + torch.randn(100, generator=g) / 10).to(dtype)
    res = torch.randn(2, 3, 100, generator=g).to(dtype)
    y = rms_norm(x, w, 1e-6)
    y2, s = rms_norm(x, w, 1e-6, residual=res)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref_fn(x, w, 1e-6), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y2, ref_fn(x + res, w, 1e-6), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(y, ref_fn(x, w, 1e-6)) and torch.equal(y2, ref_fn(x + res, w, 1e-6))
    assert torch.equal(s, x + res)


def _fp8_quant() -> None:
    from ops.fp8 import block_quantize
    from ops.fp8_train import quantize_1x128
    from ops.triton.fp8 import quantize_act, quantize_weight

    # Every e4m3 value, every midpoint between neighbours (ties to even) and a spread, with a 448 in each
    # row so that the scale is exactly 1 and the rounding itself is tested.
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, -(grid[1:] + grid[:-1]) / 2, torch.randn(500) * 30])
    vals = vals.clamp(-448, 448)
    rows = -(-vals.numel() // 127)
    body = torch.zeros(rows * 127)
    body[: vals.numel()] = vals
    x = torch.cat([torch.full((rows, 1), 448.0), body.view(rows, 127), torch.randn(rows, 72)], dim=1)  # K=200
    q, s = quantize_act(x)
    rq, rs = quantize_1x128(x)
    assert s.shape == (rows, 2) and torch.equal(s, rs) and bool((s[:, 0] == 1).all())
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    w = torch.randn(200, 300) * torch.logspace(-3, 2, 300)  # varied block magnitudes
    qw, sw = quantize_weight(w)
    rqw, rsw = block_quantize(w)
    assert sw.shape == (2, 3) and torch.equal(sw, rsw)
    assert torch.equal(qw.view(torch.uint8), rqw.view(torch.uint8))


def _fp8_gemm() -> None:
    from ops.fp8 import block_quantize
    from ops.fp8_train import fp8_gemm_ref, quantize_1x128
    from ops.triton.fp8 import fp8_gemm

    g = torch.Generator().manual_seed(9)
    a = torch.randn(20, 200, generator=g)  # K = 200: two K blocks, the second ragged
    b = torch.randn(150, 200, generator=g) * 3  # N = 150 spans two weight-scale blocks
    aq, asc = quantize_1x128(a)
    bq, bsc = block_quantize(b)
    ref = fp8_gemm_ref(aq, asc, bq, bsc)
    for out_dtype in (torch.float32, torch.float16):
        c = fp8_gemm(aq, asc, bq, bsc, out_dtype=out_dtype, block_m=16, block_n=32)
        assert c.dtype == out_dtype
        tol = 1e-5 if out_dtype == torch.float32 else 1e-3
        torch.testing.assert_close(c.float(), ref, rtol=0, atol=tol * float(ref.abs().max()))
    # And the whole FP8 path stays close to the unquantized product (e4m3's 2^-4 relative rounding).
    assert float((ref - a @ b.T).abs().max()) < 0.1 * float((a @ b.T).abs().max())


def _kernels_forced_triton() -> None:
    from ops import kernels

    x, gate, up, down, counts = _experts(torch.float32, counts=(2, 0, 3))
    assert kernels.kernel_backend("cpu", "triton") == "triton"
    y = kernels.grouped_swiglu(x, gate, up, down, counts, backend="triton")
    torch.testing.assert_close(y, kernels.grouped_swiglu(x, gate, up, down, counts, backend="torch"))
    w = torch.ones(40)
    torch.testing.assert_close(kernels.rms_norm(x, w, backend="triton"), kernels.rms_norm(x, w, backend="torch"))
    y_t, s_t = kernels.add_rms_norm(x, 2 * x, w, backend="triton")
    y_r, s_r = kernels.add_rms_norm(x, 2 * x, w, backend="torch")
    torch.testing.assert_close(y_t, y_r)
    assert torch.equal(s_t, s_r)


def _model_logits_with_triton() -> None:
    """builtin:tiny's logits with MOERUN_KERNELS=triton (what `auto` picks on CUDA): the model's RMSNorms and
    routed experts go through ops.kernels to the Triton kernels, and the logits equal the torch path's."""
    import os

    import ops.triton.grouped_gemm as tri_gemm
    import ops.triton.rmsnorm as tri_norm
    from runtime import load_model

    model = load_model("builtin:tiny")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = {"norm": 0, "experts": 0}
    orig_norm, orig_experts = tri_norm.rms_norm, tri_gemm.grouped_swiglu

    def norm(*a, **k):
        calls["norm"] += 1
        return orig_norm(*a, **k)

    def experts(*a, **k):
        calls["experts"] += 1
        return orig_experts(*a, **k)

    with torch.no_grad():
        os.environ["MOERUN_KERNELS"] = "torch"
        ref = model.logits(ids)
        tri_norm.rms_norm, tri_gemm.grouped_swiglu = norm, experts
        os.environ["MOERUN_KERNELS"] = "triton"
        try:
            got = model.logits(ids)
        finally:
            tri_norm.rms_norm, tri_gemm.grouped_swiglu = orig_norm, orig_experts
            del os.environ["MOERUN_KERNELS"]
    assert calls["norm"] >= 4 * 3 + 1 and calls["experts"] == 3, calls  # 4 layers x 3 norms + final; 3 MoE
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


CASES = {
    "decode_fp32_page16": lambda: _decode(16, torch.float32),
    "decode_fp32_page64": lambda: _decode(64, torch.float32),
    "decode_fp16_page16": lambda: _decode(16, torch.float16),
    "decode_fp16_page64": lambda: _decode(64, torch.float16),
    "decode_odd_page_size": _decode_odd_page,
    "grouped_linear_fp32": lambda: _grouped_linear(torch.float32, False),
    "grouped_linear_fp16": lambda: _grouped_linear(torch.float16, False),
    "grouped_linear_default_blocks": lambda: _grouped_linear(torch.float32, True),
    "grouped_swiglu_fp32": lambda: _grouped_swiglu(torch.float32),
    "grouped_swiglu_fp16": lambda: _grouped_swiglu(torch.float16),
    "grouped_one_expert_and_schedule": _grouped_all_empty_but_one,
    "rmsnorm_fp32": lambda: _rmsnorm(torch.float32),
    "rmsnorm_fp16": lambda: _rmsnorm(torch.float16),
    "fp8_quantize": _fp8_quant,
    "fp8_gemm": _fp8_gemm,
    "kernels_forced_triton": _kernels_forced_triton,
    "model_logits_with_triton": _model_logits_with_triton,
}


def _run_cases() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, fn in CASES.items():
        try:
            fn()
            out[name] = None
        except Exception:  # reported to the parent, one failure per case
            out[name] = traceback.format_exc(limit=4)
    return out


# --- pytest side -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("MOERUN_KERNELS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=280,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"interpreter run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_torch_twin(interpreter_results, case):
    err = interpreter_results[case]
    assert err is None, f"{case}:\n{err}"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 (no CUDA here)")
    print(json.dumps(_run_cases()))
