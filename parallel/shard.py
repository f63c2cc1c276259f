"""Turn a DeepSeek MLA/MoE module tree into its TP/EP-sharded form, and load checkpoints slice by slice.

Works by attribute names (the runtime model's HF-style names), without importing runtime (dependencies
point runtime -> parallel):

* TP (`tp_group` of size > 1): `embed_tokens` -> VocabParallelEmbedding; `lm_head` -> ColumnParallelLinear
  with gather_output (full logits on every rank); MLA splits heads: q_proj / q_b_proj and kv_b_proj
  column-parallel, o_proj row-parallel, latent down-projections (q_a_proj, kv_a_proj_with_mqa) replicated;
  dense MLPs and shared experts column (gate/up) / row (down). The output of kv_a_proj_with_mqa enters the
  per-head region through `copy_to_tp` (a forward hook), so kv_a_layernorm's gain sees a partial gradient:
  call `all_reduce_partial_grads(model, tp_group)` after backward.
* EP (`ep_group` of size > 1): every stacked expert parameter keeps experts [r*E/ep, (r+1)*E/ep) and the
  MoE's `dispatcher` becomes an `EPDispatcher` (parallel.expert over the EP group). With TP as well, each TP
  rank dispatches only its 1/tp share of the (TP-replicated) tokens and the outputs are all-gathered, so
  every token reaches its experts exactly once.

Applied to a model on the meta device it only changes shapes, which is how sharded loading works:
build on meta -> `parallelize` -> `to_empty` -> load the checkpoint with `sharded_select(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from parallel import expert as ep_ops
from parallel.routing import NodeLimit
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_tp,
    scatter_rows_to_tp,
    shard,
)

_EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


def _size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# Shard marks live on modules (`module._moerun_shard[param leaf name] = {...}`), not on parameters:
# Module.to_empty / .to may replace Parameter objects, and the marks must survive building on meta.
_MARKS = "_moerun_shard"


def _mark(module: nn.Module, leaf: str, **info) -> None:
    marks = module.__dict__.setdefault(_MARKS, {})
    marks.setdefault(leaf, {}).update(info)


def _mark_tp(module: nn.Module, leaf: str, dim: int, group: ProcessGroup) -> None:
    _mark(module, leaf, tp_dim=dim, tp_rank=_rank(group), tp_size=_size(group))


def shard_marks(model: nn.Module) -> dict[str, dict]:
    """Full parameter name -> how it is sharded: tp_dim/tp_rank/tp_size, ep_offset/ep_size, tp_partial."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, info in module.__dict__.get(_MARKS, {}).items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = info
    return out


def _column(lin: nn.Linear, group: ProcessGroup, **kw) -> ColumnParallelLinear:
    layer = ColumnParallelLinear.from_full(lin.weight.detach(), group, bias=_b(lin), **kw)
    _mark_tp(layer, "weight", 0, group)
    if layer.bias is not None:
        _mark_tp(layer, "bias", 0, group)
    return layer


def _row(lin: nn.Linear, group: ProcessGroup) -> RowParallelLinear:
    layer = RowParallelLinear.from_full(lin.weight.detach(), group, bias=_b(lin))
    _mark_tp(layer, "weight", 1, group)
    return layer


def _b(lin: nn.Linear) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach()


def _copy_hook(group: ProcessGroup) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(output, group)

    return hook


class EPDispatcher:
    """The runtime MoE's dispatcher interface (`dispatch(x, idx, w) -> (recv_x, handle)`, `combine`) over
    an EP group; with `tp_group`, tokens are first split over TP (padded rows route nowhere)."""

    def __init__(self, ep_group: ProcessGroup, num_experts: int, tp_group: ProcessGroup | None = None,
                 capacity_factor: float | None = None) -> None:
        self.ep_group, self.num_experts = ep_group, num_experts
        self.tp_group = tp_group if _size(tp_group) > 1 else None
        self.capacity_factor = capacity_factor

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
                 ) -> tuple[torch.Tensor, ep_ops.DispatchHandle]:
        n = x.shape[0]
        if self.tp_group is not None:
            tp = _size(self.tp_group)
            pad = (-n) % tp
            if pad:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                topk_idx = torch.cat([topk_idx, topk_idx.new_full((pad, topk_idx.shape[1]), -1)])
                topk_weights = torch.cat([topk_weights, topk_weights.new_zeros(pad, topk_weights.shape[1])])
            x, topk_weights = scatter_rows_to_tp([x, topk_weights], self.tp_group)
            topk_idx = shard(topk_idx, 0, self.tp_group)
        recv, handle = ep_ops.dispatch(x, topk_idx, topk_weights, self.ep_group, self.num_experts,
                                       self.capacity_factor)
        handle.tp_tokens = n
        return recv, handle

    def combine(self, y: torch.Tensor, handle: ep_ops.DispatchHandle) -> torch.Tensor:
        out = ep_ops.combine(y, handle)
        if self.tp_group is not None:
            out = gather_from_tp(out, self.tp_group, dim=0)[:handle.tp_tokens]
        return out


def parallelize(model: nn.Module, tp_group: ProcessGroup | None = None,
                ep_group: ProcessGroup | None = None, capacity_factor: float | None = None,
                node_limit: tuple[list[int], int] | None = None) -> nn.Module:
    """Shard `model` in place for TP over `tp_group` and EP over `ep_group` (either may be None/size 1).

    `node_limit = (node of each EP rank, M)` turns on node-limited routing: every token's experts lie on
    at most M nodes of the EP group (parallel/routing.py); ignored when the EP group is on one node.
    """
    tp, ep = _size(tp_group), _size(ep_group)
    if tp > 1:
        _parallelize_tp(model, tp_group)
    if ep > 1:
        for moe in [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "dispatcher")]:
            experts = moe.experts
            num = getattr(experts, _EXPERT_PARAMS[0]).shape[0]
            per = ep_ops.experts_per_rank(num, ep)
            offset = _rank(ep_group) * per
            for name in _EXPERT_PARAMS:
                full = getattr(experts, name)
                p = nn.Parameter(full.detach()[offset:offset + per].clone(), requires_grad=full.requires_grad)
                setattr(experts, name, p)
                _mark(experts, name, ep_offset=offset, ep_rank=_rank(ep_group), ep_size=ep)
            experts.expert_offset = offset
            moe.dispatcher = EPDispatcher(ep_group, num, tp_group, capacity_factor)
            if node_limit is not None and len(set(node_limit[0])) > 1 and node_limit[1] > 0:
                moe.gate.expert_mask = NodeLimit(node_limit[0], per, node_limit[1],
                                                 moe.gate.cfg.num_experts_per_tok)
    return model


def _parallelize_tp(model: nn.Module, group: ProcessGroup) -> None:
    tied = (hasattr(model, "lm_head") and hasattr(model, "model") and hasattr(model.model, "embed_tokens")
            and model.lm_head.weight is model.model.embed_tokens.weight)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                emb = VocabParallelEmbedding.from_full(child.weight.detach(), group)
                _mark_tp(emb, "weight", 0, group)
                setattr(parent, name, emb)
        if hasattr(parent, "kv_b_proj") and hasattr(parent, "o_proj"):  # MLA
            for name in ("q_proj", "q_b_proj", "kv_b_proj"):
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, _column(getattr(parent, name), group))
            parent.o_proj = _row(parent.o_proj, group)
            parent.kv_a_proj_with_mqa.register_forward_hook(_copy_hook(group))
            _mark(parent.kv_a_layernorm, "weight", tp_partial=True)
        elif all(isinstance(getattr(parent, n, None), nn.Linear) for n in _EXPERT_PARAMS):  # dense MLP
            parent.gate_proj = _column(parent.gate_proj, group)
            parent.up_proj = _column(parent.up_proj, group)
            parent.down_proj = _row(parent.down_proj, group)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = _column(model.lm_head, group, gather_output=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight


def all_reduce_partial_grads(model: nn.Module, tp_group: ProcessGroup | None) -> None:
    """Sum over TP the gradients of replicated parameters that received per-rank partial gradients
    (marked tp_partial by `parallelize`, or `sequence_parallel`). Call after backward, before clipping."""
    if _size(tp_group) == 1:
        return
    marks = shard_marks(model)
    for name, p in model.named_parameters():
        partial = marks.get(name, {}).get("tp_partial", False) or getattr(p, "sequence_parallel", False)
        if partial and p.grad is not None:
            dist.all_reduce(p.grad, group=tp_group)


def all_reduce_data_parallel_grads(model: nn.Module, dp_group: ProcessGroup | None,
                                   edp_group: ProcessGroup | None) -> None:
    """Make gradients those of the mean loss over the dp copies of the model.

    Dense parameters: sum over `dp_group`, divide by dp. Expert parameters: the EP all-to-all already summed
    the contributions of the dp copies inside the EP group, so sum only over `edp_group` (the ranks holding
    the same experts) and divide by dp as well. (Summing experts over dp would count tokens twice.)
    """
    dp = _size(dp_group)
    marks = shard_marks(model)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        group = edp_group if marks.get(name, {}).get("ep_offset") is not None else dp_group
        if _size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if dp > 1:
            p.grad.div_(dp)


@dataclass
class ShardSelection:
    """Duck-typed twin of runtime.model.hf_checkpoint.Selection: what to read (`index`) and where (`slot`)."""

    index: tuple = ()
    slot: int | None = None


def sharded_select(model: nn.Module) -> Callable[[str, int | None, tuple], ShardSelection | None]:
    """The checkpoint loader's `select` hook for a parallelized model: each rank reads only its TP slices
    and its experts (None = skip the tensor), from the marks `parallelize` left on the modules."""
    marks = shard_marks(model)
    params = dict(model.named_parameters(remove_duplicate=False))

    def select(name: str, expert: int | None, shape: tuple) -> ShardSelection | None:
        info = marks.get(name, {})
        if expert is not None:
            offset = info.get("ep_offset", 0)
            count = params[name].shape[0] if name in params else 0
            return ShardSelection((), expert - offset) if offset <= expert < offset + count else None
        dim = info.get("tp_dim")
        if dim is None:
            return ShardSelection()
        chunk = shape[dim] // info["tp_size"]
        index = [slice(None)] * len(shape)
        index[dim] = slice(info["tp_rank"] * chunk, (info["tp_rank"] + 1) * chunk)
        return ShardSelection(tuple(index))

    return select


def gather_full(model: nn.Module, tp_group: ProcessGroup | None, ep_group: ProcessGroup | None,
                grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient, zeros where none) gathered to full shape, by name. Collective
    over tp and ep: for checks and for layout-independent checkpoints."""
    from parallel.tensor import _all_gather

    marks = shard_marks(model)
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p
        t, info = t.detach(), marks.get(name, {})
        if info.get("tp_dim") is not None:
            t = _all_gather(t, info["tp_dim"], tp_group)
        if info.get("ep_offset") is not None and _size(ep_group) > 1:
            t = _all_gather(t, 0, ep_group)
        out[name] = t
    return out
