"""Token dispatch to experts and back: one all-to-all primitive (`Transfer`), one routing handle
(`DispatchHandle`), and the `Dispatcher` the model is built with (single process, EP, EP under TP).

Placement: the EP group's rank w holds global experts [w*E/ep, (w+1)*E/ep) ("local experts").

Semantics (DeepEP normal mode):
- `dispatch` sends each token once to every rank that holds at least one of its chosen experts
  (deduplicated per rank), with its top-k expert ids and weights. Receive order is source rank, then
  source token. The receiver then expands the tokens to one row per (token, local expert) pair, grouped
  contiguous per local expert (`handle.tokens_per_expert` rows each, in receive order within an expert)
  so a grouped GEMM can run over them. Without a group (one process, or ep = 1) nothing travels and the
  same grouping happens locally: one code path.
- Weights are applied by the caller on the expert side: `y = expert(recv_x) * recv_weights[:, None]`.
  `combine` is then an unweighted sum: rows of the same received token are summed on the expert rank,
  sent back, and summed over ranks at the source. With identity experts, combine(dispatch(x)) is the
  routing-weighted sum `sum_k w_k * x` per token.
- Autograd: dispatch and combine are linear maps built as exact adjoints: dispatch = expand o send,
  combine = send^T o expand^T, where send is one `Transfer` (an autograd Function whose backward is the
  reverse transfer) and expand is a row gather (its backward a row scatter-add). So dispatch's backward is
  a combine and combine's backward is a dispatch; the routing weights travel through the same machinery,
  so the router receives gradients.
- Hand-driven backward (parallel/pipeline/overlap.py starts and waits transfers itself, outside autograd):
  the handle's `combine_async` (rows -> source tokens, and per-row values -> [tokens, K] at their top-k
  slot: the gradients of dispatch w.r.t. the tokens and the routing weights) and `resend_async` (source
  tokens -> rows: the gradient of combine).
- Async: `dispatch_async` exchanges counts (one small blocking all-to-all: buffer sizes depend on it; the
  only host synchronisation of a dispatch), then starts the token transfer and returns at once;
  `handle.wait()` finishes it. Every transfer can be held behind an emulated link (parallel/link.py):
  `transfer.delay(link, nbytes)`, or a `Dispatcher(link=...)` that delays each of its transfers by its
  off-rank bytes.
- Dry runs (`moerun dryrun`, fake tensors): the counts cannot be read, so each rank takes the balanced
  expectation of uniform routing (`expected_counts`); everything else runs as written.
- Dropless by default. With `capacity_factor`, each rank keeps at most
  ceil(capacity_factor * tokens * top_k / num_experts) of its own (token, expert) pairs per expert, in
  token order; the rest are dropped (they contribute nothing) and counted in `handle.num_dropped`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cluster import group_rank, group_size
from cluster.fake import is_fake, no_fake_mode
from parallel.routing import NodeLimit
from parallel.tensor import gather_from_tp, scatter_rows_to_tp, shard

__all__ = ["Transfer", "DispatchHandle", "Dispatcher", "dispatch_async", "dispatch", "combine_async", "combine",
           "global_expert_counts", "experts_per_rank", "expected_counts"]


class Transfer:
    """One all-to-all of one or more row-aligned tensors, in flight: `wait()` returns the received tensors
    (after `finish`, if given). Without a group it is the identity, done at once. The one primitive every
    expert-parallel transfer of the project goes through, forward and backward."""

    def __init__(self, xs: Sequence[torch.Tensor], out_splits: list[int], in_splits: list[int],
                 group: ProcessGroup | None, finish: Callable | None = None, link=None) -> None:
        self.finish, self._works, self._result = finish, [], None
        if group is None:
            self._outs = [x for x in xs]
        else:
            self._outs = []
            for x in xs:
                x = x.contiguous()
                out = x.new_empty((sum(out_splits), *x.shape[1:]))
                work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
                self._works.append((work, x))  # the send buffer stays alive until the transfer is done
                self._outs.append(out)
            if link is not None:
                me = group_rank(group)
                rows = max(sum(out_splits) - out_splits[me], sum(in_splits) - in_splits[me])
                self.delay(link, rows * sum(math.prod(x.shape[1:]) * x.element_size() for x in xs))

    def delay(self, link, nbytes: int) -> None:
        """Hold the pending transfer back as ONE transfer of `nbytes` on `link` (a parallel.link.EmulatedLink,
        or anything with its `wrap_works(works, nbytes)`): `wait()` then returns no earlier than its emulated
        arrival. Call it before `wait()`."""
        if self._result is not None:
            raise RuntimeError("delay() after wait(): the transfer is already complete")
        link.wrap_works(self._works, nbytes)

    def wait(self):
        """The received tensors as a tuple, or what `finish(*received)` makes of them."""
        if self._result is None:
            for work, _ in self._works:
                work.wait()
            self._works.clear()
            outs = tuple(self._outs)
            self._outs = []
            self._result = self.finish(*outs) if self.finish is not None else outs
        return self._result


class _AllToAll(torch.autograd.Function):
    """A transfer as ONE autograd node (tokens and weights together: if they had separate nodes, a rank
    whose expert rows are empty would skip one backward collective and mis-pair its peers'); backward is
    the reverse transfer. Missing gradients are materialised as zeros, so every rank runs the backward.
    The forward may be left in flight: its `Transfer` goes to `pending` and must be waited before the
    outputs are read."""

    @staticmethod
    def forward(ctx, out_splits, in_splits, group, link, pending, *xs):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.link = out_splits, in_splits, group, link
        transfer = Transfer(xs, out_splits, in_splits, group)
        pending.append(transfer)
        return tuple(transfer._outs)

    @staticmethod
    def backward(ctx, *grads):
        back = Transfer(grads, ctx.in_splits, ctx.out_splits, ctx.group, link=ctx.link).wait()
        return (None, None, None, None, None, *back)


def _send_async(xs: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group,
                link=None) -> tuple[Transfer, tuple]:
    """Start a transfer that autograd differentiates when it must: (the transfer, its output tensors)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        pending: list = []
        outs = _AllToAll.apply(out_splits, in_splits, group, link, pending, *xs)
        return pending[0], outs
    t = Transfer(xs, out_splits, in_splits, group)
    return t, tuple(t._outs)


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """bincount without its host synchronisation (on CUDA bincount reads the maximum back)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


@dataclass(eq=False)
class DispatchHandle:
    """A dispatch: what combine and the hand-driven backward need, plus the load counts. The fields set by
    `wait()` are None before."""

    group: ProcessGroup | None
    num_experts: int
    experts_per_rank: int
    num_tokens: int                  # N: tokens this rank dispatched
    top_k: int
    send_counts: list[int]           # tokens sent to each EP rank (deduplicated)
    recv_counts: list[int]           # tokens received from each EP rank
    recv_pairs: int                  # (token, local expert) rows this rank receives
    send_token_idx: torch.Tensor     # [sum(send_counts)] source token of each sent row
    expert_counts: torch.Tensor      # [E] (token, expert) pairs this rank routed, after drops
    dropped_per_expert: torch.Tensor  # [E] pairs this rank dropped by capacity
    link: object = None
    _pending: list = field(default_factory=list, repr=False)   # transfers in flight
    _recv: tuple = field(default=(), repr=False)                # (idx [T,K], x [T,H], w [T,K]) once arrived
    recv_rows: torch.Tensor | None = None           # [R] received-token row of each grouped row
    recv_slots: torch.Tensor | None = None          # [R] top-k slot (0..K-1) of each grouped row in its token
    recv_expert: torch.Tensor | None = None         # [R] local expert of each grouped row
    tokens_per_expert: torch.Tensor | None = None   # [E/ep] grouped rows per local expert
    recv_weights: torch.Tensor | None = None        # [R] routing weight of each grouped row (autograd)
    tp_tokens: int | None = None                    # set by a Dispatcher under TP: tokens before the split
    _result: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.recv_counts)

    @property
    def num_dropped(self) -> int:
        return int(self.dropped_per_expert.sum())

    def delay(self, link, nbytes: int) -> None:
        """As `Transfer.delay`, for the token transfer of this dispatch (before `wait()`)."""
        if self._result is not None:
            raise RuntimeError("delay() after wait(): the transfer is already complete")
        works = [w for t in self._pending for w in t._works]
        link.wrap_works(works, nbytes)
        for t in self._pending:
            t._works[:] = works[: len(t._works)]
            works = works[len(t._works):]

    def wait(self) -> torch.Tensor:
        """Finish the token transfer; return recv_x [R, H] grouped contiguous per local expert (and fill
        recv_rows, recv_slots, recv_expert, tokens_per_expert, recv_weights)."""
        if self._result is None:
            for t in self._pending:
                t.wait()
            recv_idx, recv_x, recv_w = self._recv
            self._pending, self._recv = [], ()
            flat = recv_idx.reshape(-1)
            # the valid (token, slot) pairs in receive order, then grouped by local expert (stable)
            pairs = torch.argsort((flat < 0).to(torch.int8), stable=True)[: self.recv_pairs]
            experts = flat[pairs]
            order = torch.argsort(experts, stable=True)
            pairs, self.recv_expert = pairs[order], experts[order]
            self.recv_rows, self.recv_slots = pairs // self.top_k, pairs % self.top_k
            if is_fake(self.recv_expert):  # a dry run: the balanced split, as values the host can read
                with no_fake_mode():
                    per, extra = divmod(self.recv_pairs, self.experts_per_rank)
                    self.tokens_per_expert = torch.tensor([per + (e < extra) for e in range(self.experts_per_rank)],
                                                          device="cpu")  # host values: the split
            else:
                self.tokens_per_expert = _count(self.recv_expert, self.experts_per_rank)
            self.recv_weights = recv_w[self.recv_rows, self.recv_slots]
            self._result = recv_x.index_select(0, self.recv_rows)
        return self._result

    # --- the way back, and the hand-driven backward ---------------------------------------------------
    def _check_rows(self, y: torch.Tensor) -> None:
        if self.recv_rows is None:
            raise RuntimeError("combine before the dispatch finished: call handle.wait() first")
        if y.shape[0] != self.recv_rows.shape[0]:
            raise ValueError(f"combine expects {self.recv_rows.shape[0]} rows (one per dispatched "
                             f"(token, expert) pair), got {y.shape[0]}")

    def _to_sources(self, back: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return back  # every token is its own "received" token
        out = back.new_zeros((self.num_tokens, *back.shape[1:]))
        return out.index_add(0, self.send_token_idx, back)

    def combine_async(self, y: torch.Tensor, slot_values: torch.Tensor | None = None) -> Transfer:
        """Start returning rows y [R, ...] to their source tokens (summed): `wait()` gives [N, ...]. With
        `slot_values` [R] (per-row values such as the routing weights' gradient), in the same transfer:
        `wait()` gives ([N, ...], [N, K] with each value at its row's top-k slot)."""
        self._check_rows(y)
        sends = [y.new_zeros((self.num_recv_tokens, *y.shape[1:])).index_add(0, self.recv_rows, y)]
        if slot_values is not None:
            per_token = slot_values.new_zeros(self.num_recv_tokens, self.top_k)
            per_token.index_put_((self.recv_rows, self.recv_slots), slot_values, accumulate=True)
            sends.append(per_token)

        def finish(*backs):
            out = tuple(self._to_sources(b) for b in backs)
            return out if slot_values is not None else out[0]

        return Transfer(sends, self.send_counts, self.recv_counts, self.group, finish, self.link)

    def resend_async(self, t: torch.Tensor) -> Transfer:
        """Start sending per-source-token values t [N, ...] to the grouped rows [R, ...] (the gradient of
        combine, and a dispatch of anything else along this handle's routes)."""
        send = t if self.group is None else t.index_select(0, self.send_token_idx)
        return Transfer([send], self.recv_counts, self.send_counts, self.group,
                        lambda back: back.index_select(0, self.recv_rows), self.link)


def experts_per_rank(num_experts: int, ep: int) -> int:
    """E / ep, or a clear error: experts are placed in equal contiguous blocks per EP rank."""
    if num_experts % ep != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {ep}")
    return num_experts // ep


def _check_inputs(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  ep: int, values: bool) -> int:
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
    # Checking the ids' range reads them on the host (a sync): the functional API does, the model's
    # Dispatcher (whose ids come from its own router) does not.
    if values and topk_idx.numel() and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts}) (-1 = no expert)")
    return epr


def _apply_capacity(topk_idx: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Mark with -1 the (token, expert) pairs past each expert's capacity, in token-major order."""
    n, k = topk_idx.shape
    capacity = math.ceil(capacity_factor * n * k / num_experts)
    flat = topk_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices              # pairs grouped by expert, token order kept
    sorted_ids = flat[order]
    counts = _count(sorted_ids + 1, num_experts + 1)           # slot 0 counts the -1 pairs
    start = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - start[sorted_ids + 1]
    keep = (flat >= 0) & (position < capacity)
    return torch.where(keep, flat, torch.full_like(flat, -1)).view(n, k)


def dispatch_async(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                   group: ProcessGroup | None, num_experts: int, capacity_factor: float | None = None,
                   link=None, check_ids: bool = True) -> DispatchHandle:
    """Start sending tokens to their experts' ranks; `handle.wait()` returns the grouped rows.

    x: [N, H] this rank's tokens; topk_idx: [N, K] global expert ids (-1 = unused slot);
    topk_weights: [N, K] routing weights (gradients flow back to them through `handle.recv_weights`).
    `group` None (or of size 1): everything stays here. `link`: every transfer of this dispatch (and of
    its combine and backward) is delayed by its off-rank bytes on that emulated link. `check_ids` checks
    the ids' range (a host read of them; the model's Dispatcher skips it).
    """
    if group is not None and group_size(group) == 1:
        group = None
    if group is None and capacity_factor is None and not torch.is_grad_enabled():
        return _dispatch_local(x, topk_idx, topk_weights, num_experts, link)
    ep = group_size(group)
    epr = _check_inputs(x, topk_idx, topk_weights, num_experts, ep, check_ids)
    n, k = topk_idx.shape
    routed = topk_idx.long()
    if capacity_factor is not None:
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        routed = _apply_capacity(routed, num_experts, capacity_factor)
    valid = routed >= 0
    expert_counts = _count((routed + 1).reshape(-1), num_experts + 1)[1:]  # bin 0 holds the unused slots
    dropped = torch.where((topk_idx >= 0) & ~valid, topk_idx.long() + 1, 0)
    dropped_per_expert = _count(dropped.reshape(-1), num_experts + 1)[1:]
    dest = torch.where(valid, routed // epr, torch.full_like(routed, -1))                # [N, K]
    hits = dest.unsqueeze(-1) == torch.arange(ep, device=x.device)                      # [N, K, ep]
    to_rank = hits.any(1)                                                               # [N, ep]
    sent = torch.stack([to_rank.sum(0), hits.sum((0, 1))])                              # [2, ep] tokens, pairs
    if group is None:
        recv_pairs = n * k if is_fake(sent) else int(sent[1, 0])  # the one host sync of a dispatch
        handle = DispatchHandle(None, num_experts, epr, n, k, [n], [n], recv_pairs,
                                torch.arange(n, device=x.device), expert_counts, dropped_per_expert, link)
        handle._recv = (routed, x, topk_weights)
        return handle
    got = torch.empty_like(sent.t().contiguous())
    dist.all_to_all_single(got, sent.t().contiguous(), group=group)                     # [ep, 2] from each
    if is_fake(got):  # a dry run (moerun dryrun): no values to read; every rank routes as expected
        counts = expected_counts(n, k, ep, num_experts)
    else:
        counts = torch.cat([sent[0], got[:, 0], got[:, 1]]).tolist()  # the one host sync of a dispatch
    send_counts, recv_counts, recv_pairs = counts[:ep], counts[ep:2 * ep], sum(counts[2 * ep:])
    # rows to send, by destination rank then token (an argsort where nonzero would sync again)
    order = torch.argsort((~to_rank.t().reshape(-1)).to(torch.int8), stable=True)[: sum(send_counts)]
    dest_rank, send_token_idx = order // n, order % n
    rows = routed.index_select(0, send_token_idx)
    mine = dest.index_select(0, send_token_idx) == dest_rank.unsqueeze(1)
    send_idx = torch.where(mine, rows - dest_rank.unsqueeze(1) * epr, torch.full_like(rows, -1))
    send_x = x.index_select(0, send_token_idx)
    send_w = topk_weights.index_select(0, send_token_idx) * mine.to(topk_weights.dtype)
    handle = DispatchHandle(group, num_experts, epr, n, k, send_counts, recv_counts, recv_pairs, send_token_idx,
                            expert_counts, dropped_per_expert, link)
    idx_t = Transfer([send_idx], recv_counts, send_counts, group)
    xw_t, (recv_x, recv_w) = _send_async([send_x, send_w], recv_counts, send_counts, group, link)
    handle._pending, handle._recv = [idx_t, xw_t], (idx_t._outs[0], recv_x, recv_w)
    if link is not None:
        me = group_rank(group)
        row = x.shape[1] * x.element_size() + k * (8 + topk_weights.element_size())
        handle.delay(link, max(sum(send_counts) - send_counts[me], sum(recv_counts) - recv_counts[me]) * row)
    return handle


def _dispatch_local(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                    link) -> DispatchHandle:
    """`dispatch_async` with every expert here, no capacity and no autograd (serving): the same handle and
    rows as the general path (pairs grouped by expert, token order kept), in a few operators and without a
    host synchronisation, so a step's shapes depend on its token count alone."""
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_weights.shape != topk_idx.shape:
        _check_inputs(x, topk_idx, topk_weights, num_experts, 1)  # raises, naming the problem
    n, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = _count(flat, num_experts)
    handle = DispatchHandle(None, num_experts, num_experts, n, k, [n], [n], n * k, torch.arange(n, device=x.device),
                            counts, torch.zeros_like(counts), link)
    handle.recv_rows, handle.recv_slots = order // k, order % k
    handle.recv_expert, handle.tokens_per_expert = flat[order], counts
    handle.recv_weights = topk_weights.reshape(-1)[order]
    handle._result = x.index_select(0, handle.recv_rows)
    return handle


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, group: ProcessGroup | None,
             num_experts: int, capacity_factor: float | None = None, link=None
             ) -> tuple[torch.Tensor, DispatchHandle]:
    """Blocking dispatch: (recv_x grouped per local expert, handle). See the module docstring."""
    handle = dispatch_async(x, topk_idx, topk_weights, group, num_experts, capacity_factor, link)
    return handle.wait(), handle


def combine_async(y: torch.Tensor, handle: DispatchHandle) -> Transfer:
    """Start returning expert outputs y [R, H] (weights already applied) to their source tokens, under
    autograd: `wait()` gives [N, H], for each source token the sum of its expert rows."""
    handle._check_rows(y)
    if y.shape[0] == 0 and torch.is_grad_enabled() and handle._result.requires_grad:
        # nothing reached this rank's experts, and an empty expert output may be cut off from the graph;
        # keep the dispatch node reachable so its backward transfer runs here as on every other rank
        y = y + handle._result.sum() * 0
    per_token = y.new_zeros((handle.num_recv_tokens, *y.shape[1:])).index_add(0, handle.recv_rows, y)
    if handle.group is None:
        return Transfer([per_token], [], [], None, finish=lambda t: t)
    t, (back,) = _send_async([per_token], handle.send_counts, handle.recv_counts, handle.group, handle.link)
    if handle.link is not None:
        me = group_rank(handle.group)
        rows = max(handle.num_recv_tokens - handle.recv_counts[me], sum(handle.send_counts) - handle.send_counts[me])
        t.delay(handle.link, rows * math.prod(per_token.shape[1:]) * per_token.element_size())
    t.finish = lambda *_: handle._to_sources(back)
    return t


def combine(y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Blocking combine: [N, H], for each source token the sum of its expert rows."""
    return combine_async(y, handle).wait()


def global_expert_counts(handle: DispatchHandle) -> torch.Tensor:
    """[E] pairs routed to each expert summed over the EP group (a blocking all-reduce; metrics)."""
    counts = handle.expert_counts.clone()
    if handle.group is not None:
        dist.all_reduce(counts, group=handle.group)
    return counts


def expected_counts(n: int, k: int, ep: int, num_experts: int) -> list[int]:
    """A dispatch's counts when routing is uniform and every rank alike (what a dry run assumes: fake
    tensors carry no routes): [tokens sent to each rank] + [tokens received from each] + [pairs received
    from each]. A token reaches a rank when one of its k distinct experts (of E) lies in that rank's E/ep:
    probability 1 - C(E - E/ep, k) / C(E, k); each rank receives n*k/ep pairs from every source."""
    epr = num_experts // ep
    p = 1.0 - math.comb(num_experts - epr, k) / math.comb(num_experts, k) if k <= num_experts else 1.0
    tokens, pairs = round(n * p), round(n * k / ep)
    return [tokens] * ep + [tokens] * ep + [pairs] * ep


class Dispatcher:
    """What the model's MoE layers dispatch through, built once from the layout and given to the model.

    `group`: the EP group (None: one process holds every expert). With `tp_group`, the tokens (replicated
    over TP) are first split over TP so each reaches its experts once, and the outputs are all-gathered.
    `node_limit = (node of each EP rank, M)`: each token's experts lie on at most M nodes (routing.py).
    `link`: an emulated interconnect that delays every transfer (parallel.emulate_link)."""

    def __init__(self, num_experts: int, group: ProcessGroup | None = None, tp_group: ProcessGroup | None = None,
                 capacity_factor: float | None = None, node_limit: tuple[list[int], int] | None = None,
                 link=None) -> None:
        self.group = group if group_size(group) > 1 else None
        self.tp_group = tp_group if group_size(tp_group) > 1 and self.group is not None else None
        self.num_experts, self.capacity_factor, self.link = num_experts, capacity_factor, link
        ep = group_size(self.group)
        self.experts_per_rank = experts_per_rank(num_experts, ep)
        self.local_experts = range(group_rank(self.group) * self.experts_per_rank,
                                   (group_rank(self.group) + 1) * self.experts_per_rank)
        self.node_limit = node_limit if node_limit and len(set(node_limit[0])) > 1 and node_limit[1] > 0 else None

    @classmethod
    def from_mesh(cls, mesh, num_experts: int, max_nodes_per_token: int = 0, link=None) -> Dispatcher:
        """The dispatcher of a Mesh's EP (and TP) groups; None mesh: one process."""
        if mesh is None or mesh.size("ep") == 1:
            return cls(num_experts, link=link)
        limit = ([mesh.node_of(r) for r in mesh.ranks("ep")], max_nodes_per_token) if max_nodes_per_token else None
        return cls(num_experts, mesh.group("ep"), mesh.group("tp"), node_limit=limit, link=link)

    def expert_mask(self, top_k: int) -> NodeLimit | None:
        """The gate's candidate restriction under node-limited routing (None: unrestricted)."""
        if self.node_limit is None:
            return None
        return NodeLimit(self.node_limit[0], self.experts_per_rank, self.node_limit[1], top_k)

    def dispatch_async(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
                       ) -> DispatchHandle:
        n = x.shape[0]
        if self.tp_group is not None:
            tp = group_size(self.tp_group)
            pad = (-n) % tp
            if pad:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                topk_idx = torch.cat([topk_idx, topk_idx.new_full((pad, topk_idx.shape[1]), -1)])
                topk_weights = torch.cat([topk_weights, topk_weights.new_zeros(pad, topk_weights.shape[1])])
            x, topk_weights = scatter_rows_to_tp([x, topk_weights], self.tp_group)
            topk_idx = shard(topk_idx, 0, self.tp_group)
        handle = dispatch_async(x, topk_idx, topk_weights, self.group, self.num_experts, self.capacity_factor,
                                self.link, check_ids=False)
        handle.tp_tokens = n
        return handle

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
                 ) -> tuple[torch.Tensor, DispatchHandle]:
        handle = self.dispatch_async(x, topk_idx, topk_weights)
        return handle.wait(), handle

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        out = combine(y, handle)
        if self.tp_group is not None:
            out = gather_from_tp(out, self.tp_group, dim=0)[: handle.tp_tokens]
        return out
