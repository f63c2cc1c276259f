"""Small helpers shared by the kernel modules (imports triton)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter; anything else is a clear error."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"Triton kernel got a {t.device.type} tensor: use CUDA, or set TRITON_INTERPRET=1 to run on CPU "
            "(or use the torch path: MOERUN_KERNELS=torch)"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision dot (tight parity); 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def round_to_e4m3(x):
    """Round fp32 (already clamped to [-448, 448]) to the nearest float8_e4m3fn value, ties to even, in fp32.

    Software rounding for the interpreter, whose own fp8 cast mis-rounds across binades; the result is exact
    on the e4m3 grid, so a following cast to fp8 is lossless.
    """
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below the smallest normal (2^-6) the spacing is the subnormal 2^-9
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = a / ulp  # exact (power of two), < 16
    y = (y + 8388608.0) - 8388608.0  # round half to even in fp32
    r = y * ulp
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # keep the sign bit, so -0.0 stays -0.0
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
