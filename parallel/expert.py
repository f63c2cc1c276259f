"""The expert-parallel dispatcher: tokens travel to the ranks that hold their experts and come back.

Placement: the EP group's rank w holds global experts [w*E/ep, (w+1)*E/ep) ("local experts").

Semantics (DeepEP normal mode):
- `dispatch` sends each token once to every rank that holds at least one of its chosen experts
  (deduplicated per rank), with its top-k expert ids and weights. Receive order is source rank, then
  source token. The receiver then expands the tokens to one row per (token, local expert) pair, grouped
  contiguous per local expert (`handle.tokens_per_expert` rows each, in receive order within an expert)
  so a grouped GEMM can run over them.
- Weights are applied by the caller on the expert side: `y = expert(recv_x) * recv_weights[:, None]`.
  `combine` is then an unweighted sum: rows of the same received token are summed on the expert rank,
  sent back, and summed over ranks at the source. With identity experts, combine(dispatch(x)) is the
  routing-weighted sum `sum_k w_k * x` per token.
- Autograd: dispatch and combine are linear maps built as exact adjoints: dispatch = expand o send,
  combine = send^T o expand^T, where send is the `all_to_all_single` (an autograd Function whose
  backward is the reverse all-to-all) and expand is a row gather (its backward is a row scatter-add).
  So dispatch's backward is a combine and combine's backward is a dispatch. The routing weights travel
  through the same machinery, so the router receives gradients.
- Async: `dispatch_async` exchanges counts (a small blocking all-to-all; buffer sizes depend on it),
  then starts the token all-to-alls and returns at once; `handle.wait()` finishes them and returns the
  grouped tokens. `combine_async(...).wait()` likewise. Compute placed between the two calls (shared
  experts, another micro-batch's attention) overlaps the transfer.
- Public hooks for code that drives the transfers itself (parallel/pipeline/overlap.py's phase engine):
  `handle.delay(link, nbytes)` puts a handle's pending transfers behind an emulated link
  (parallel/link.py) before `wait()`, and after `wait()` the pair (`recv_rows`, `recv_slots`) gives each
  grouped row's received token and top-k slot, so a hand-written backward can scatter row gradients (of
  the tokens and of the routing weights) back to the [received tokens, K] layout the transfer used.
- Dropless by default. With `capacity_factor`, each rank keeps at most
  ceil(capacity_factor * tokens * top_k / num_experts) of its own (token, expert) pairs per expert, in
  token order; the rest are dropped (they contribute nothing) and counted in `handle.num_dropped`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup,
         works: list | None) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=works is not None)
    if works is not None:
        works.append((work, x))  # keep the send buffer alive until the transfer is done
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single of one or more row-aligned tensors as ONE autograd node; backward is the
    reverse all-to-all of their gradients, in the same order. One node matters: if tokens and weights had
    separate nodes, a rank whose expert rows are empty (so one output gets no gradient) would skip one
    collective and pair its peers' transfers wrongly. Missing gradients are materialised as zeros, so the
    node's collectives run on every rank. May run async: the outputs are returned at once and `works`
    receives the pending works to wait on before reading them."""

    @staticmethod
    def forward(ctx, out_splits, in_splits, group, works, *xs):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return tuple(_a2a(x, out_splits, in_splits, group, works) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        back = tuple(_a2a(g, ctx.in_splits, ctx.out_splits, ctx.group, None) for g in grads)
        return (None, None, None, None, *back)


def _all_to_all(xs: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group: ProcessGroup,
                works: list | None) -> tuple[torch.Tensor, ...]:
    if any(x.requires_grad for x in xs) and torch.is_grad_enabled():
        return _AllToAll.apply(out_splits, in_splits, group, works, *xs)
    return tuple(_a2a(x, out_splits, in_splits, group, works) for x in xs)


@dataclass(eq=False)
class DispatchHandle:
    """Everything combine needs, plus the load counts. Fields filled at wait() are None before."""

    group: ProcessGroup
    num_experts: int
    experts_per_rank: int
    num_tokens: int                  # N: tokens this rank dispatched
    send_counts: list[int]           # tokens sent to each EP rank (deduplicated)
    recv_counts: list[int]           # tokens received from each EP rank
    send_token_idx: torch.Tensor     # [sum(send_counts)] source token of each sent row
    expert_counts: torch.Tensor      # [E] (token, expert) pairs this rank routed, after drops
    num_dropped: int                 # (token, expert) pairs this rank dropped by capacity
    dropped_per_expert: torch.Tensor  # [E]
    _works: list = field(default_factory=list, repr=False)
    _recv_x: torch.Tensor | None = field(default=None, repr=False)
    _recv_idx: torch.Tensor | None = field(default=None, repr=False)
    _recv_w: torch.Tensor | None = field(default=None, repr=False)
    recv_rows: torch.Tensor | None = None           # [R] received-token row of each grouped row
    tokens_per_expert: torch.Tensor | None = None   # [E/ep] grouped rows per local expert
    recv_weights: torch.Tensor | None = None        # [R] routing weight of each grouped row (autograd)
    recv_expert: torch.Tensor | None = None         # [R] local expert of each grouped row
    recv_slots: torch.Tensor | None = None          # [R] top-k slot (0..K-1) of each grouped row in its token
    tp_tokens: int | None = None                    # set by shard.EPDispatcher: tokens before the TP split
    _result: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.recv_counts)

    @property
    def weights(self) -> torch.Tensor | None:
        """Alias of recv_weights (the runtime model's experts read `handle.weights`)."""
        return self.recv_weights

    def delay(self, link, nbytes: int) -> None:
        """Hold the pending transfers back as ONE transfer of `nbytes` on `link` (a parallel.link.EmulatedLink,
        or anything with its `wrap_works(works, nbytes)`): `wait()` then returns no earlier than its emulated
        arrival. Call it before `wait()`."""
        _delay(self._works, self._result is not None, link, nbytes)

    def wait(self) -> torch.Tensor:
        """Finish the token transfer; return recv_x [R, H] grouped contiguous per local expert.

        Also fills recv_rows / recv_slots (received token and top-k slot of each grouped row),
        recv_expert, tokens_per_expert and recv_weights."""
        if self._result is not None:
            return self._result
        for work, _ in self._works:
            work.wait()
        self._works.clear()
        valid = self._recv_idx >= 0
        rows, slots = valid.nonzero(as_tuple=True)         # ordered by (source rank, source token, k)
        experts = self._recv_idx[rows, slots]
        order = torch.sort(experts, stable=True).indices    # group by local expert, keep receive order
        self.recv_rows, self.recv_slots, self.recv_expert = rows[order], slots[order], experts[order]
        self.tokens_per_expert = torch.bincount(self.recv_expert, minlength=self.experts_per_rank)
        self.recv_weights = self._recv_w[self.recv_rows, self.recv_slots]
        self._result = self._recv_x.index_select(0, self.recv_rows)
        self._recv_x = self._recv_w = self._recv_idx = None
        return self._result


@dataclass(eq=False)
class CombineHandle:
    """A combine in flight: `wait()` returns the combined tokens."""

    _works: list
    _back: torch.Tensor
    _handle: DispatchHandle
    _result: torch.Tensor | None = None

    def delay(self, link, nbytes: int) -> None:
        """As `DispatchHandle.delay`: the return transfer completes no earlier than its emulated arrival."""
        _delay(self._works, self._result is not None, link, nbytes)

    def wait(self) -> torch.Tensor:
        """Finish the return transfer; return [N, H], the sum of the expert rows of each source token."""
        if self._result is None:
            for work, _ in self._works:
                work.wait()
            self._works.clear()
            h = self._handle
            out = self._back.new_zeros((h.num_tokens, *self._back.shape[1:]))
            self._result = out.index_add(0, h.send_token_idx, self._back)
            self._back = None  # type: ignore[assignment]
        return self._result


def _delay(works: list, finished: bool, link, nbytes: int) -> None:
    if finished:
        raise RuntimeError("delay() after wait(): the transfer is already complete")
    link.wrap_works(works, nbytes)


def experts_per_rank(num_experts: int, ep: int) -> int:
    """E / ep, or a clear error: experts are placed in equal contiguous blocks per EP rank."""
    if num_experts % ep != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {ep}")
    return num_experts // ep


def _check_inputs(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  ep: int) -> int:
    if x.dim() != 2:
        raise ValueError(f"dispatch expects x of shape [tokens, hidden], got {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [tokens={x.shape[0]}, k], got {tuple(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match "
                         f"topk_idx {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be an integer tensor, got {topk_idx.dtype}")
    epr = experts_per_rank(num_experts, ep)
    if topk_idx.numel() and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts}) (-1 = no expert)")
    return epr


def _apply_capacity(topk_idx: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Mark with -1 the (token, expert) pairs past each expert's capacity, in token-major order."""
    n, k = topk_idx.shape
    capacity = math.ceil(capacity_factor * n * k / num_experts)
    flat = topk_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices              # pairs grouped by expert, token order kept
    sorted_ids = flat[order]
    counts = torch.bincount(sorted_ids + 1, minlength=num_experts + 1)   # slot 0 counts the -1 pairs
    start = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - start[sorted_ids + 1]
    keep = (flat >= 0) & (position < capacity)
    return torch.where(keep, flat, torch.full_like(flat, -1)).view(n, k)


def dispatch_async(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, group: ProcessGroup,
                   num_experts: int, capacity_factor: float | None = None) -> DispatchHandle:
    """Start sending tokens to their experts' ranks; `handle.wait()` returns the grouped rows.

    x: [N, H] this rank's tokens; topk_idx: [N, K] global expert ids (-1 = unused slot);
    topk_weights: [N, K] routing weights (gradients flow back to them through `handle.recv_weights`).
    """
    ep = dist.get_world_size(group)
    epr = _check_inputs(x, topk_idx, topk_weights, num_experts, ep)
    topk_idx = topk_idx.long()
    routed = topk_idx
    if capacity_factor is not None:
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        routed = _apply_capacity(topk_idx, num_experts, capacity_factor)
    valid = routed >= 0
    dropped = (topk_idx >= 0) & ~valid
    dropped_per_expert = torch.bincount(topk_idx[dropped], minlength=num_experts)
    expert_counts = torch.bincount(routed[valid], minlength=num_experts)

    dest = torch.where(valid, routed // epr, torch.full_like(routed, -1))                 # [N, K]
    to_rank = (dest.unsqueeze(-1) == torch.arange(ep, device=x.device)).any(1)           # [N, ep]
    dest_rank, send_token_idx = to_rank.t().nonzero(as_tuple=True)                         # by rank, token
    send_counts_t = to_rank.sum(0)
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()

    # per sent row: the K slots, with local expert ids for this destination and -1 elsewhere
    rows_dest = routed.index_select(0, send_token_idx)
    mine = dest.index_select(0, send_token_idx) == dest_rank.unsqueeze(1)
    send_idx = torch.where(mine, rows_dest - dest_rank.unsqueeze(1) * epr, torch.full_like(rows_dest, -1))
    send_w = topk_weights.index_select(0, send_token_idx) * mine.to(topk_weights.dtype)

    handle = DispatchHandle(group=group, num_experts=num_experts, experts_per_rank=epr, num_tokens=x.shape[0],
                            send_counts=send_counts, recv_counts=recv_counts, send_token_idx=send_token_idx,
                            expert_counts=expert_counts, num_dropped=int(dropped.sum()),
                            dropped_per_expert=dropped_per_expert)
    works = handle._works
    (handle._recv_idx,) = _all_to_all([send_idx], recv_counts, send_counts, group, works)
    handle._recv_x, handle._recv_w = _all_to_all([x.index_select(0, send_token_idx), send_w], recv_counts,
                                                 send_counts, group, works)
    return handle


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, group: ProcessGroup,
             num_experts: int, capacity_factor: float | None = None) -> tuple[torch.Tensor, DispatchHandle]:
    """Blocking dispatch: (recv_x grouped per local expert, handle). See the module docstring."""
    handle = dispatch_async(x, topk_idx, topk_weights, group, num_experts, capacity_factor)
    return handle.wait(), handle


def combine_async(y: torch.Tensor, handle: DispatchHandle) -> CombineHandle:
    """Start returning expert outputs y [R, H] (weights already applied) to their source tokens."""
    if handle.recv_rows is None:
        raise RuntimeError("combine before the dispatch finished: call handle.wait() first")
    if y.shape[0] != handle.recv_rows.shape[0]:
        raise ValueError(f"combine expects {handle.recv_rows.shape[0]} rows (one per dispatched "
                         f"(token, expert) pair), got {y.shape[0]}")
    if y.shape[0] == 0 and torch.is_grad_enabled() and handle._result.requires_grad:
        # nothing reached this rank's experts, and an empty expert output may be cut off from the graph;
        # keep the dispatch node reachable so its backward all-to-all runs here as on every other rank
        y = y + handle._result.sum() * 0
    per_token = y.new_zeros((handle.num_recv_tokens, *y.shape[1:])).index_add(0, handle.recv_rows, y)
    works: list = []
    (back,) = _all_to_all([per_token], handle.send_counts, handle.recv_counts, handle.group, works)
    return CombineHandle(works, back, handle)


def combine(y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Blocking combine: [N, H], for each source token the sum of its expert rows."""
    return combine_async(y, handle).wait()


def global_expert_counts(handle: DispatchHandle) -> torch.Tensor:
    """[E] pairs routed to each expert summed over the EP group (a blocking all-reduce; metrics)."""
    counts = handle.expert_counts.clone()
    dist.all_reduce(counts, group=handle.group)
    return counts
