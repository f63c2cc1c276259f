"""DeepSeek-V3's FP8 training recipe (arXiv 2412.19437 section 3.3), emulated exactly on any device.

Every linear GEMM (forward, activation gradient, weight gradient) takes FP8 (float8_e4m3fn) operands with
fine-grained scales and accumulates in fp32; master weights, gradients and optimizer state stay fp32 (or
bf16). The quantization groups follow the paper:

* Fprop  y  = x @ W^T:   x in 1x128 groups along K (per token), W in 128x128 blocks.
* Dgrad  dx = dy @ W:    dy in 1x128 groups along N (per token), W in the same 128x128 blocks.
* Wgrad  dW = dy^T @ x:  both operands grouped 128x1, i.e. 128 consecutive tokens of one channel share a
  scale (the reduction runs over tokens); done here by 1x128 grouping of the transposes.

Scales are amax / 448 per group (e4m3's largest finite value), floored at 1e-12. Emulation: quantize to
float8_e4m3fn (round to nearest even), dequantize with the same blocking, and run the GEMM in fp32. This is
numerically what an FP8 tensor-core GEMM with fp32 accumulation and per-block rescaling computes, up to the
order of the fp32 additions; `ops.triton.fp8.fp8_gemm` is the real FP8 kernel, tested against `fp8_gemm_ref`.

Embedding, LM head, router, norms and attention's softmax stay in high precision, as in the paper.
`convert_to_fp8_training(model)` switches a built model's linear layers and grouped experts in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ops.fp8 import E4M3_MAX, block_dequantize, block_quantize
from ops.moe import swiglu

GROUP = 128


def quantize_1x128(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q float8_e4m3fn [..., K], scale fp32 [..., cdiv(K, group)]), one scale per 1 x group."""
    k = x.shape[-1]
    g = -(-k // group)
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    padded = xf.new_zeros(xf.shape[0], g * group)
    padded[:, :k] = xf
    blocks = padded.view(-1, g, group)
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-12) / E4M3_MAX
    q = (blocks / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(-1, g * group)[:, :k].reshape(*lead, k), scale.view(*lead, g)


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Inverse of `quantize_1x128` (fp32): q * scale broadcast over each 1 x group."""
    k = q.shape[-1]
    if scale.shape[-1] != -(-k // group) or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} with 1x{group} groups"
        )
    return q.float() * scale.float().repeat_interleave(group, dim=-1)[..., :k]


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """x rounded through FP8 with 1x128 groups along the last dim (fp32 result)."""
    return dequantize_1x128(*quantize_1x128(x))


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] rounded through FP8 with 128x128 blocks (fp32 result)."""
    return block_dequantize(*block_quantize(w))


def fp8_gemm_ref(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch twin of `ops.triton.fp8.fp8_gemm`: (a_q * a_scale [1x128]) @ (b_q * b_scale [128x128]).T."""
    return (dequantize_1x128(a_q, a_scale) @ block_dequantize(b_q, b_scale).T).to(out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x @ W^T with all three GEMMs on FP8-rounded operands (see module docstring for the groups)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)  # the weight is held anyway: re-quantised in the backward, not kept
        ctx.dtypes = (x.dtype, weight.dtype)
        return (fake_quant_act(x) @ fake_quant_weight(weight).T).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (fake_quant_act(dy) @ fake_quant_weight(weight)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw = (fake_quant_act(dy.T) @ fake_quant_act(x.T).T).to(w_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the FP8 recipe's GEMMs (any leading dims); the bias is added in high precision."""
    k = x.shape[-1]
    y = _Fp8LinearFn.apply(x.reshape(-1, k), weight).view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def fp8_grouped_swiglu(
    x: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
) -> torch.Tensor:
    """`ops.moe.grouped_swiglu` with FP8 GEMMs: each expert's weights are quantized in their own 128x128
    blocks, and weight-gradient groups of 128 tokens never span two experts."""
    outs = []
    start = 0
    for e, c in enumerate(tokens_per_expert.tolist()):
        if c:
            xe = x[start : start + c]
            h = swiglu(fp8_linear(xe, gate_proj[e]), fp8_linear(xe, up_proj[e]))
            outs.append(fp8_linear(h, down_proj[e]))
            start += c
    if not outs:
        return x.new_zeros(0, down_proj.shape[1])
    return torch.cat(outs, dim=0)


class Fp8Linear(nn.Linear):
    """nn.Linear whose GEMMs follow the FP8 recipe; same parameters and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


class Fp8GroupedExpertsMixin:
    """Put in front of a grouped-experts class (stacked gate/up/down_proj [E, out, in], forward(rows,
    tokens_per_expert, weights)) to run its GEMMs in FP8."""

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = fp8_grouped_swiglu(rows, self.gate_proj, self.up_proj, self.down_proj, tokens_per_expert)
        return y * weights[:, None].to(y.dtype)


def _is_grouped_experts(m: nn.Module) -> bool:
    params = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)


_MIXED: dict[type, type] = {}


def convert_to_fp8_training(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Switch a built model to the FP8 recipe in place; returns the names of its FP8 modules.

    Plain `nn.Linear` layers become `Fp8Linear` and grouped-expert modules get `Fp8GroupedExpertsMixin`, by
    changing the module's class: parameters, state-dict names, hooks and any optimizer already holding the
    parameters are untouched, and converting twice is harmless. Modules whose name equals or ends with an
    entry of `skip` stay as they are (the LM head by default; the embedding, router and norms are not linear
    layers). Subclasses of nn.Linear (e.g. tensor-parallel layers with their own communication) are left
    alone.
    """
    converted = []
    for name, m in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if type(m) is nn.Linear:
            m.__class__ = Fp8Linear
        elif _is_grouped_experts(m) and not isinstance(m, Fp8GroupedExpertsMixin):
            cls = type(m)
            if cls not in _MIXED:
                _MIXED[cls] = type(f"Fp8{cls.__name__}", (Fp8GroupedExpertsMixin, cls), {})
            m.__class__ = _MIXED[cls]
        if isinstance(m, (Fp8Linear, Fp8GroupedExpertsMixin)):
            converted.append(name)
    if not converted:
        raise ValueError("convert_to_fp8_training found no nn.Linear or grouped-expert modules to convert")
    return converted
