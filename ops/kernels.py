"""Kernel selection: the Triton kernel on CUDA, the torch reference op elsewhere, with the same signatures.

Choice, strongest first: the `backend=` argument of each function, the environment variable
`MOERUN_KERNELS` (`torch`, `triton` or `auto`), then `auto`: Triton when the tensors are on a CUDA device
and the `triton` package is installed, torch otherwise. A CPU user never imports triton or `ops.triton`
(the kernel modules are imported inside the functions, only when chosen). Forcing `triton` on CPU works only
under Triton's interpreter (`TRITON_INTERPRET=1`, for tests) and is a clear error otherwise.

The Triton kernels are forward-only: a call that must record autograd history (grad enabled and an input
requiring grad) always takes the torch path, so training is unaffected by the switch.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ops.paged_attention import DecodeIndex

ENV = "MOERUN_KERNELS"
CHOICES = ("auto", "torch", "triton")


def triton_installed() -> bool:
    """True when the `triton` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_backend(device: torch.device | str, backend: str | None = None) -> str:
    """'triton' or 'torch' for tensors on `device`, given an explicit `backend` and the environment."""
    choice = backend or os.environ.get(ENV) or "auto"
    if choice not in CHOICES:
        src = "backend argument" if backend else f"environment variable {ENV}"
        raise ValueError(f"{src} is {choice!r}; expected one of {', '.join(CHOICES)}")
    if choice == "torch":
        return "torch"
    # called for every kernel of every layer: no new torch.device for one that already is
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if choice == "triton":
        if not triton_installed():
            raise RuntimeError(f"{ENV}=triton but the triton package is not installed")
        if dev_type == "cuda" or (dev_type == "cpu" and _interpreting()):
            return "triton"
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {dev_type}); on CPU set TRITON_INTERPRET=1 to run them in "
            f"Triton's interpreter, or use {ENV}=torch"
        )
    return "triton" if dev_type == "cuda" and triton_installed() else "torch"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors)


def _pick(backend: str | None, *tensors: torch.Tensor) -> str:
    if _needs_grad(*tensors):
        return "torch"
    return kernel_backend(tensors[0].device, backend)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """`ops.norm.rms_norm` or its fused Triton twin."""
    if _pick(backend, x, weight) == "triton":
        from ops.triton.rmsnorm import rms_norm as tri

        return tri(x, weight, eps)
    from ops.norm import rms_norm as ref

    return ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); Triton fuses the add into the norm's single pass."""
    if _pick(backend, x, residual, weight) == "triton":
        from ops.triton.rmsnorm import rms_norm as tri

        return tri(x, weight, eps, residual=residual)
    from ops.norm import rms_norm as ref

    s = x + residual
    return ref(s, weight, eps), s


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """`ops.moe.grouped_linear` (rows sorted by expert, weight [E, out, in]) or the Triton grouped GEMM."""
    if _pick(backend, x, weight) == "triton":
        from ops.triton.grouped_gemm import grouped_linear as tri

        return tri(x, weight, tokens_per_expert)
    from ops.moe import grouped_linear as ref

    return ref(x, weight, tokens_per_expert)


def grouped_swiglu(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                   tokens_per_expert: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """`ops.moe.grouped_swiglu` or the Triton version with gate/up/SwiGLU fused in one kernel."""
    if _pick(backend, x, gate_proj, up_proj, down_proj) == "triton":
        from ops.triton.grouped_gemm import grouped_swiglu as tri

        return tri(x, gate_proj, up_proj, down_proj, tokens_per_expert)
    from ops.moe import grouped_swiglu as ref

    return ref(x, gate_proj, up_proj, down_proj, tokens_per_expert)


def mla_decode_paged(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, softmax_scale: float, backend: str | None = None,
                     max_seq_len: int | None = None, index: DecodeIndex | None = None) -> torch.Tensor:
    """Absorbed MLA decode over the paged latent cache (layout: `ops.paged_attention`).

    `max_seq_len` (>= max(seq_lens)) lets the Triton path launch without reading seq_lens on the host.
    `index` (an `ops.paged_attention.DecodeIndex` of these block_table / seq_lens): the torch path reuses it
    instead of recomputing it (a serving step computes it once for all its layers); Triton ignores it.
    """
    if _pick(backend, q_latent, q_pe, kv_pages) == "triton":
        from ops.triton.mla_decode import mla_decode_paged as tri

        return tri(q_latent, q_pe, kv_pages, block_table, seq_lens, softmax_scale, max_seq_len=max_seq_len)
    from ops.paged_attention import mla_decode_indexed
    from ops.paged_attention import mla_decode_paged as ref

    if index is not None:
        return mla_decode_indexed(q_latent, q_pe, kv_pages, index, softmax_scale)
    return ref(q_latent, q_pe, kv_pages, block_table, seq_lens, softmax_scale)


def quantize_act(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], fp32 scale [M, cdiv(K,128)]), one scale per 1x128 group."""
    if kernel_backend(x.device, backend) == "triton":
        from ops.triton.fp8 import quantize_act as tri

        return tri(x)
    from ops.fp8_train import quantize_1x128

    return quantize_1x128(x)


def quantize_weight(w: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], fp32 scale [cdiv(N,128), cdiv(K,128)]), one per 128x128 block."""
    if kernel_backend(w.device, backend) == "triton":
        from ops.triton.fp8 import quantize_weight as tri

        return tri(w)
    from ops.fp8 import block_quantize

    return block_quantize(w)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
    """A @ B.T from FP8 operands with 1x128 (A) and 128x128 (B) scales, fp32 accumulation."""
    if kernel_backend(a_q.device, backend) == "triton":
        from ops.triton.fp8 import fp8_gemm as tri

        return tri(a_q, a_scale, b_q, b_scale, out_dtype)
    from ops.fp8_train import fp8_gemm_ref

    return fp8_gemm_ref(a_q, a_scale, b_q, b_scale, out_dtype)
