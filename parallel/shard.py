"""Tensor-parallel sharding by a plan, shard marks, and the reductions and checkpoint hooks that read them.

parallel/ knows no model's attribute names: the model says how it splits (`model.tp_plan()`: module name ->
style) and which experts a rank holds (it is built with a `parallel.expert.Dispatcher` and marks its stacked
expert parameters with `mark_expert_shard`). TP styles (`tp_group` of size > 1):
* `vocab`: an embedding split over the vocabulary (VocabParallelEmbedding);
* `colwise` / `colwise_gather`: a linear split by output rows (ColumnParallelLinear; `_gather` all-gathers
  the output, e.g. an LM head with full logits on every rank);
* `rowwise`: a linear split by input columns (RowParallelLinear, output all-reduced);
* `enter_tp`: a replicated module whose output enters a per-head region (`copy_to_tp`, a forward hook);
* `partial_grad`: a replicated module whose gradient is partial per rank (summed by
  `all_reduce_partial_grads` after backward).
Weights tied before the split (an LM head sharing the embedding) stay tied after it.

Applied to a model on the meta device it only changes shapes, which is how sharded loading works:
build on meta with the dispatcher -> `apply_tp_plan` -> `to_empty` -> load the checkpoint with
`sharded_select(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from cluster import group_rank, group_size
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_dim,
    copy_to_tp,
)

# Shard marks live on modules (`module._moerun_shard[param leaf name] = {...}`), not on parameters:
# Module.to_empty / .to may replace Parameter objects, and the marks must survive building on meta.
_MARKS = "_moerun_shard"


def _mark(module: nn.Module, leaf: str, **info) -> None:
    marks = module.__dict__.setdefault(_MARKS, {})
    marks.setdefault(leaf, {}).update(info)


def _mark_tp(module: nn.Module, leaf: str, dim: int, group: ProcessGroup) -> None:
    _mark(module, leaf, tp_dim=dim, tp_rank=group_rank(group), tp_size=group_size(group))


def shard_marks(model: nn.Module) -> dict[str, dict]:
    """Full parameter name -> how it is sharded: tp_dim/tp_rank/tp_size, ep_offset/ep_size, tp_partial."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, info in module.__dict__.get(_MARKS, {}).items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = info
    return out


def mark_expert_shard(module: nn.Module, leaves: tuple[str, ...], offset: int, ep_size: int) -> None:
    """Mark stacked expert parameters `leaves` of `module` as holding global experts from `offset` on, one
    block of an EP group of `ep_size` (read by checkpoints, the optimizer's reductions and gathers)."""
    if ep_size > 1:
        for leaf in leaves:
            _mark(module, leaf, ep_offset=offset, ep_size=ep_size)


TP_STYLES = ("vocab", "colwise", "colwise_gather", "rowwise", "enter_tp", "partial_grad")


def apply_tp_plan(model: nn.Module, plan: dict[str, str], group: ProcessGroup | None) -> nn.Module:
    """Shard `model` in place over `group` by `plan` (module name -> one of TP_STYLES); no-op at size 1."""
    if group_size(group) == 1:
        return model
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, list[str]] = {}  # id of a weight -> the planned modules holding it (ties)
    for name in plan:
        if name not in modules:
            raise ValueError(f"tensor-parallel plan names {name!r}, which the model does not have")
        w = getattr(modules[name], "weight", None)
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    new: dict[str, nn.Module] = {}
    for name, style in plan.items():
        if style not in TP_STYLES:
            raise ValueError(f"unknown tensor-parallel style {style!r} for {name}; valid: {', '.join(TP_STYLES)}")
        m = modules[name]
        if style == "enter_tp":
            m.register_forward_hook(lambda mod, args, out: copy_to_tp(out, group))
            continue
        if style == "partial_grad":
            _mark(m, "weight", tp_partial=True)
            continue
        new[name] = _split(m, style, group)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new[name])
    for names in owners.values():  # re-tie weights that were one before the split
        kept = [n for n in names if n in new]
        for n in kept[1:]:
            new[n].weight = new[kept[0]].weight
    return model


def _split(m: nn.Module, style: str, group: ProcessGroup) -> nn.Module:
    bias = None if getattr(m, "bias", None) is None else m.bias.detach()
    if style == "vocab":
        layer = VocabParallelEmbedding.from_full(m.weight.detach(), group)
        _mark_tp(layer, "weight", 0, group)
        return layer
    if style == "rowwise":
        layer = RowParallelLinear.from_full(m.weight.detach(), group, bias=bias)
        _mark_tp(layer, "weight", 1, group)
        return layer
    layer = ColumnParallelLinear.from_full(m.weight.detach(), group, bias=bias,
                                           gather_output=style == "colwise_gather")
    _mark_tp(layer, "weight", 0, group)
    if layer.bias is not None:
        _mark_tp(layer, "bias", 0, group)
    return layer


def all_reduce_partial_grads(model: nn.Module, tp_group: ProcessGroup | None) -> None:
    """Sum over TP the gradients of replicated parameters that received per-rank partial gradients
    (marked tp_partial by `parallelize`, or `sequence_parallel`). Call after backward, before clipping."""
    if group_size(tp_group) == 1:
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
    dp = group_size(dp_group)
    marks = shard_marks(model)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        group = edp_group if marks.get(name, {}).get("ep_offset") is not None else dp_group
        if group_size(group) > 1:
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


def to_full(t: torch.Tensor, info: dict, tp_group: ProcessGroup | None,
            ep_group: ProcessGroup | None) -> torch.Tensor:
    """A local shard -> the full tensor, from its shard marks. Collective over tp / ep."""
    if info.get("tp_dim") is not None:
        t = all_gather_dim(t, info["tp_dim"], tp_group)
    if info.get("ep_offset") is not None:
        t = all_gather_dim(t, 0, ep_group)
    return t


def full_shape(local_shape: torch.Size, info: dict) -> tuple[int, ...]:
    """The whole tensor's shape, from a shard's shape and its marks."""
    shape = list(local_shape)
    if info.get("tp_dim") is not None:
        shape[info["tp_dim"]] *= info["tp_size"]
    if info.get("ep_offset") is not None:
        shape[0] *= info["ep_size"]
    return tuple(shape)


def to_local(full: torch.Tensor, info: dict, local_shape: torch.Size) -> torch.Tensor:
    """The full tensor -> this rank's shard (the inverse of `to_full`, for any layout)."""
    if info.get("tp_dim") is not None:
        d, n, r = info["tp_dim"], info["tp_size"], info["tp_rank"]
        full = full.narrow(d, r * (full.shape[d] // n), full.shape[d] // n)
    if info.get("ep_offset") is not None:
        full = full.narrow(0, info["ep_offset"], local_shape[0])
    if tuple(full.shape) != tuple(local_shape):
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} does not slice to the local shape "
                         f"{tuple(local_shape)}")
    return full


def gather_full(model: nn.Module, tp_group: ProcessGroup | None, ep_group: ProcessGroup | None,
                grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient, zeros where none) gathered to full shape, by name. Collective
    over tp and ep: for checks and for layout-independent checkpoints."""
    marks = shard_marks(model)
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p
        out[name] = to_full(t.detach(), marks.get(name, {}), tp_group, ep_group)
    return out
