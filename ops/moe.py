"""MoE math: the router (V2 softmax / V3 sigmoid, group-limited top-k) and grouped expert SwiGLU.

Routing follows transformers' DeepseekV2/V3 exactly (the project's oracle):
* V3 `noaux_tc`: sigmoid scores; `e_score_correction_bias` is added for *selection only*; a group's score is
  the sum of its top-2 biased scores; keep `topk_group` groups; top-k experts inside them; weights are the
  unbiased scores, normalized if `norm_topk_prob`, times `routed_scaling_factor`.
* V2 `greedy` / `group_limited_greedy`: softmax scores; a group's score is its max; weights are the top-k
  scores times `routed_scaling_factor` (transformers' V2 does not normalize, whatever `norm_topk_prob` says).

Experts run as a grouped GEMM over tokens sorted by expert: `torch._grouped_mm` where torch has it for the
device/dtype, else one matmul per non-empty segment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def route(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str,
    topk_method: str,
    n_group: int | None,
    topk_group: int | None,
    bias: torch.Tensor | None,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    expert_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts for each token. router_logits [N, E] (fp32).

    `expert_mask(selection_scores) -> bool [N, E]` further restricts the candidates (node-limited routing
    under expert parallelism supplies one; this module knows nothing of nodes).

    Returns (topk_weights [N,k] fp32, topk_idx [N,k] int64, scores [N,E]: the unbiased gate scores, which the
    sequence-wise balance loss uses).
    """
    n, e = router_logits.shape
    if scoring == "sigmoid":
        scores = router_logits.sigmoid()
    elif scoring == "softmax":
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    else:
        raise ValueError(f"scoring_func {scoring!r} not supported (softmax, sigmoid)")

    if topk_method == "noaux_tc":
        choice = scores + bias if bias is not None else scores
        if expert_mask is not None:  # restrict first, so groups are ranked among allowed experts only
            choice = choice.masked_fill(~expert_mask(choice), float("-inf"))
        groups = n_group or 1
        group_scores = choice.view(n, groups, e // groups).topk(min(2, e // groups), dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(group_scores, topk_group or groups, e), float("-inf"))
        idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    elif topk_method == "group_limited_greedy":
        groups = n_group or 1
        candidates = scores if expert_mask is None else scores.masked_fill(~expert_mask(scores), 0.0)
        group_scores = candidates.view(n, groups, e // groups).max(dim=-1).values
        masked = candidates.masked_fill(~_group_mask(group_scores, topk_group or groups, e), 0.0)
        weights, idx = torch.topk(masked, k=top_k, dim=-1, sorted=False)
    elif topk_method == "greedy":
        masked = scores if expert_mask is None else scores.masked_fill(~expert_mask(scores), 0.0)
        weights, idx = torch.topk(masked, k=top_k, dim=-1, sorted=False)
    else:
        raise ValueError(f"topk_method {topk_method!r} not supported (greedy, group_limited_greedy, noaux_tc)")
    return weights * routed_scaling_factor, idx, scores


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """[N, E] bool: True for experts in the `topk_group` best groups of each token."""
    n, groups = group_scores.shape
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1], True)
    return keep[:, :, None].expand(n, groups, num_experts // groups).reshape(n, num_experts)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the DeepSeek MLP activation."""
    return F.silu(gate) * up


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return g.contiguous()


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()  # grouped_mm wants 16-byte aligned row strides
    if x.shape[1] % align or weight.shape[1] % align:
        return False
    if x.device.type == "cpu":
        return True
    # CUDA grouped_mm is implemented for bf16 on sm90+ (unverified on hardware here).
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor, force_loop: bool = False
) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ weight[e].T for x sorted by expert.

    x [M, in], weight [E, out, in] (nn.Linear layout, stacked), tokens_per_expert [E] (sum = M).
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    if not force_loop and _grouped_mm_ok(x, weight):
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
        return _ContiguousGrad.apply(out) if torch.is_grad_enabled() else out
    return _SegmentLinear.apply(x, weight, tuple(tokens_per_expert.tolist()))


class _SegmentLinear(torch.autograd.Function):
    """Fallback grouped GEMM: one matmul per non-empty segment, writing into preallocated outputs.

    Autograd through `weight[e]` slices would allocate a full [E, out, in] zero gradient per expert (O(E^2)
    memory traffic); this backward fills one gradient tensor segment by segment instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:  # noqa: D102
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(x[start : start + c], weight[e].t(), out=out[start : start + c])
                start += c
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for e, c in enumerate(ctx.counts):
            if c:
                seg = g[start : start + c]
                if gx is not None:
                    torch.mm(seg, weight[e], out=gx[start : start + c])
                if gw is not None:
                    torch.mm(seg.t(), x[start : start + c], out=gw[e])
                start += c
        return gx, gw, None


def grouped_swiglu(
    x: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    force_loop: bool = False,
) -> torch.Tensor:
    """Expert MLPs down(silu(gate x) * up x) over expert-sorted rows; weights stacked [E, out, in]."""
    h = swiglu(
        grouped_linear(x, gate_proj, tokens_per_expert, force_loop),
        grouped_linear(x, up_proj, tokens_per_expert, force_loop),
    )
    return grouped_linear(h, down_proj, tokens_per_expert, force_loop)


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, tokens_per_expert): `order` lists flat (token*k + slot) positions grouped by expert, stable."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def sequence_balance_loss(
    scores: torch.Tensor, idx: torch.Tensor, batch: int, num_experts: int, top_k: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i (report eqs. 17-20), averaged over sequences.

    scores [B*T, E] unbiased gate scores, idx [B*T, k] chosen experts; f_i = E/(k T) * hits of expert i in the
    sequence, P_i = mean over the sequence of the normalized scores.
    """
    e, k = num_experts, top_k
    s = scores.view(batch, -1, e)
    t = s.shape[1]
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    ones = torch.ones(batch, t * k, device=scores.device)
    hits = torch.zeros(batch, e, device=scores.device).scatter_add_(1, idx.view(batch, -1), ones)
    return (hits * (e / (k * t)) * p).sum(-1).mean()
