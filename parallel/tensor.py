"""Tensor parallelism: autograd-aware collectives and the Megatron-style parallel layers.

Every function and layer takes an explicit `group` (the TP process group) so it works with plain
torch.distributed groups as well as with `Mesh.group("tp")`; there is no global parallel state.

The four TP mappings are conjugate pairs (forward of one is the backward of the other):

    copy_to_tp       fwd identity          bwd all-reduce     (enter a column-parallel region)
    reduce_from_tp   fwd all-reduce        bwd identity       (leave a row-parallel region)
    scatter_to_tp    fwd split last dim    bwd all-gather     (replicated -> last-dim shards)
    gather_from_tp   fwd all-gather last   bwd split          (last-dim shards -> replicated)

and the sequence-parallel pair works along a sequence dimension `dim`:

    gather_from_sp         fwd all-gather along dim   bwd reduce-scatter along dim
    reduce_scatter_to_sp   fwd reduce-scatter         bwd all-gather
    scatter_to_sp          fwd split along dim        bwd all-gather
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from cluster import group_rank, group_size
from ops import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------------
# raw collectives (no autograd)


def divide(n: int, parts: int, what: str = "dimension") -> int:
    """n / parts, or a clear error when the split is uneven (TP shards must be equal)."""
    if n % parts != 0:
        raise ValueError(f"{what} of size {n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


def shard(tensor: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous slice of `tensor` along `dim` (for loading full weights into TP layers)."""
    size = group_size(group)
    chunk = divide(tensor.shape[dim], size, f"dim {dim} of a tensor of shape {tuple(tensor.shape)}")
    return tensor.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """The chunks of `dim` from every rank of `group`, concatenated in rank order (no autograd)."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    chunk = divide(x.shape[0], size, f"dim {dim} (reduce-scatter)")
    out = x.new_empty((chunk, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return shard(x, dim, group)


# ---------------------------------------------------------------------------------------------------
# autograd mappings


# The mappings between TP / SP regions, each a (forward, backward) pair of these collectives (Megatron's
# tensor_parallel/mappings.py has one Function per pair; here one Function takes the pair).
_COLLECTIVES = {
    "identity": lambda x, dim, group: x.view_as(x),
    "all_reduce": lambda x, dim, group: _all_reduce(x, group),
    "split": _split,
    "gather": all_gather_dim,
    "reduce_scatter": _reduce_scatter,
}


class _Mapping(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, backward, dim, group):
        ctx.backward_op, ctx.dim, ctx.group = backward, dim, group
        return _COLLECTIVES[forward](x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _COLLECTIVES[ctx.backward_op](g, ctx.dim, ctx.group), None, None, None, None


def _map(x: torch.Tensor, forward: str, backward: str, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    return _Mapping.apply(x, forward, backward, dim, group) if group_size(group) > 1 else x


class _ScatterRowsToTP(torch.autograd.Function):
    """Several tensors split along dim 0 as one node (one ordered set of all-gathers in backward)."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        return tuple(_split(x, 0, group) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(all_gather_dim(g, 0, ctx.group) for g in grads))


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Identity forward, all-reduce backward: the input of a column-parallel region."""
    return _map(x, "identity", "all_reduce", 0, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-reduce forward, identity backward: the output of a row-parallel region."""
    return _map(x, "all_reduce", "identity", 0, group)


def scatter_to_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of `dim` (default last); backward all-gathers."""
    return _map(x, "split", "gather", dim, group)


def scatter_rows_to_tp(xs: list[torch.Tensor], group: ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """This rank's dim-0 chunk of each tensor (e.g. tokens and their routing weights), as one autograd node
    whose backward all-gathers the gradients in a fixed order on every rank."""
    if group_size(group) == 1:
        return tuple(xs)
    return _ScatterRowsToTP.apply(group, *xs)


def gather_from_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """All-gather the chunks of `dim` (default last); backward keeps this rank's chunk."""
    return _map(x, "gather", "split", dim, group)


def scatter_to_sp(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Split a replicated activation along the sequence dim; backward all-gathers."""
    return _map(x, "split", "gather", dim, group)


def gather_from_sp(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence shards -> full sequence for a TP region; backward reduce-scatters the partial grads (the
    consumer is a TP region whose per-rank gradients are partial sums)."""
    return _map(x, "gather", "reduce_scatter", dim, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Partial sums of a row-parallel region -> summed sequence shards; backward all-gathers."""
    return _map(x, "reduce_scatter", "gather", dim, group)


def all_reduce_sequence_parallel_grads(module: nn.Module, group: ProcessGroup | None) -> None:
    """Sum over TP the grads of replicated parameters that only saw this rank's sequence shard.

    Under sequence parallelism, norms and row-parallel biases see a slice of the tokens, so their
    gradients are partial; layers here mark such parameters with `param.sequence_parallel = True`.
    Call after backward, before the optimizer (Megatron does the same in its grad finalisation).
    """
    if group_size(group) == 1:
        return
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


# ---------------------------------------------------------------------------------------------------
# layers


def _linear_from_full(cls, weight: torch.Tensor, group: ProcessGroup | None, bias: torch.Tensor | None, dim: int,
                      kwargs: dict) -> nn.Module:
    """A TP linear layer holding this rank's slice (along `dim` of [out, in]) of a full weight; the bias is
    sliced with the output rows (dim 0) and replicated otherwise."""
    layer = cls(weight.shape[1], weight.shape[0], group, bias=bias is not None, dtype=weight.dtype,
                device=weight.device, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(shard(weight, dim, group))
        if bias is not None:
            layer.bias.copy_(shard(bias, 0, group) if dim == 0 else bias)
    return layer


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: rank r holds rows [r*out/tp, (r+1)*out/tp).

    Input is replicated over TP (or, with `sequence_parallel`, sharded along `seq_dim` and all-gathered
    here). Output is this rank's slice of the features, or the full features with `gather_output`.
    """

    def __init__(self, in_features: int, out_features: int, group: ProcessGroup | None, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, seq_dim: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.group, self.tp = group, group_size(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = divide(out_features, self.tp, "out_features")
        self.gather_output, self.sequence_parallel, self.seq_dim = gather_output, sequence_parallel, seq_dim
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.zeros(self.out_per_rank, dtype=dtype, device=device))
                     if bias else None)
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_full(cls, weight: torch.Tensor, group: ProcessGroup | None, bias: torch.Tensor | None = None,
                  **kwargs) -> ColumnParallelLinear:
        """Build from the full [out, in] weight (and [out] bias), keeping this rank's rows."""
        return _linear_from_full(cls, weight, group, bias, 0, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sp(x, self.group, self.seq_dim)
        else:
            x = copy_to_tp(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} ({self.out_per_rank}/rank), "
                f"tp={self.tp}, gather_output={self.gather_output}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial products are summed over TP.

    With `input_is_parallel` (the usual case after a ColumnParallelLinear) the input already holds this
    rank's slice of the features; otherwise it is replicated and split here. The bias is replicated and
    added once, after the reduction. With `sequence_parallel` the reduction is a reduce-scatter along
    `seq_dim`, so the output is this rank's sequence shard.
    """

    def __init__(self, in_features: int, out_features: int, group: ProcessGroup | None, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, seq_dim: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.group, self.tp = group, group_size(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, self.tp, "in_features")
        self.input_is_parallel, self.sequence_parallel, self.seq_dim = (input_is_parallel,
                                                                        sequence_parallel, seq_dim)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_full(cls, weight: torch.Tensor, group: ProcessGroup | None, bias: torch.Tensor | None = None,
                  **kwargs) -> RowParallelLinear:
        """Build from the full [out, in] weight, keeping this rank's input columns; bias replicated."""
        return _linear_from_full(cls, weight, group, bias, 1, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, self.seq_dim)
        else:
            y = reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} ({self.in_per_rank}/rank), out={self.out_features}, tp={self.tp}, "
                f"input_is_parallel={self.input_is_parallel}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over TP: rank r holds ids [r*V/tp, (r+1)*V/tp).

    Each rank looks up the ids it owns, writes zeros for the others, and the partial results are summed
    over TP (or reduce-scattered along `seq_dim` with `sequence_parallel`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: ProcessGroup | None,
                 sequence_parallel: bool = False, seq_dim: int = 1, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.group, self.tp = group, group_size(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = divide(num_embeddings, self.tp, "vocabulary size")
        self.vocab_start = group_rank(group) * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_full(cls, weight: torch.Tensor, group: ProcessGroup | None, **kwargs) -> VocabParallelEmbedding:
        layer = cls(weight.shape[0], weight.shape[1], group, dtype=weight.dtype, device=weight.device,
                    **kwargs)
        with torch.no_grad():
            layer.weight.copy_(shard(weight, 0, group))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(y, self.group, self.seq_dim)
        return reduce_from_tp(y, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} ({self.per_rank}/rank), {self.embedding_dim}, tp={self.tp}"


# ---------------------------------------------------------------------------------------------------
# vocab-parallel cross-entropy


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index, group):
        ctx_dtype = logits.dtype
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        gmax = local_max.clone()
        if group_size(group) > 1:
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax.unsqueeze(-1)
        v_local = logits.shape[-1]
        ignored = target == ignore_index
        local_t = target - vocab_start
        outside = (local_t < 0) | (local_t >= v_local) | ignored
        local_t = local_t.masked_fill(outside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([picked, sum_exp])
        if group_size(group) > 1:
            dist.all_reduce(both, group=group)
        picked, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocabulary, this rank's columns
        ctx.save_for_backward(exp, local_t, outside, ignored)
        ctx.in_dtype = ctx_dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside, ignored = ctx.saved_tensors
        grad = softmax  # reused in place (saves a vocab-sized buffer): backward runs once
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None,
                                 vocab_start: int | None = None, ignore_index: int = IGNORE_INDEX,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over logits whose last dim is this rank's vocabulary slice; never gathers them.

    The max and the sum of exponentials are all-reduced over `group`, as is the target logit (found on
    exactly one rank). `vocab_start` defaults to rank * local_vocab (the VocabParallel / column-parallel
    layout). Matches F.cross_entropy(full_logits, target, ignore_index=..., reduction=...) in value and
    gradient; computed in fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    if vocab_start is None:
        vocab_start = group_rank(group) * logits.shape[-1]
    loss = _VocabParallelCE.apply(logits, target, vocab_start, ignore_index, group)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
