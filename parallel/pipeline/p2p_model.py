"""NCCL's point-to-point semantics as a model of posted groups: the rules the validator proves a lowered
program against and the simulator times it with. `cluster/p2p.py`'s emulation enforces the same rules on
real ranks over gloo, and the tests check that the two agree.

- Every POST is one *item*: one batch_isend_irecv group (a single isend / irecv is a group of one).
- Per rank pair, a rank's items run one at a time, in posting order (NCCL runs a pair's p2p kernels in
  order on one stream). An item with ops to several peers sits in each of those pairs' queues and starts
  when it is at the head of all of them. `per_rank=True` is stricter: one queue per rank for all its peers
  (PyTorch's batched p2p on NCCL uses the group's one communicator, hence one stream).
- Matching: the k-th send rank A posts to rank B meets the k-th receive B posts from A (no tags).
- Rendezvous: an op completes only when its own item and its partner's item have both started (a send
  does not finish before the peer's receive runs; nothing is buffered eagerly), `comm` time units after
  the later start. Ops inside one item progress together.
- An item completes when all its ops have; waiting for any op of a group waits for the whole group.

Times are in the simulator's units; the validator uses the model with every time 0 and asks only whether
an op completes at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .schedule import SEND, Action


@dataclass(eq=False)
class Item:
    """One posted group on one rank."""

    rank: int
    seq: int  # this rank's posting index
    ops: tuple[Action, ...]
    posted: float
    queues: tuple[tuple, ...]
    started: float | None = None
    done: float | None = None
    op_done: list = field(default_factory=list)

    def __str__(self) -> str:
        return f"rank {self.rank}'s POST #{self.seq} [{', '.join(str(o) for o in self.ops)}]"


class P2PModel:
    """Posted groups of all ranks, their queues, matches and completion times (see the module docstring)."""

    def __init__(self, pp: int, comm: float = 0.0, per_rank: bool = False) -> None:
        self.pp, self.comm, self.per_rank = pp, comm, per_rank
        self.queues: dict[tuple, deque[Item]] = {}
        self.last_done: dict[tuple, float] = {}
        self.sends: dict[tuple[int, int], list[tuple[Item, int]]] = {}  # (src, dst) -> posted sends in order
        self.recvs: dict[tuple[int, int], list[tuple[Item, int]]] = {}  # (src, dst) -> posted receives
        self.partner: dict[tuple[int, int], tuple[Item, int]] = {}  # (id(item), op index) -> partner op
        self.item_of: dict[tuple[int, Action], Item] = {}
        self.posted: list[list[Item]] = [[] for _ in range(pp)]
        self.active: list[Item] = []
        self.mismatches: list[str] = []

    def _queue_key(self, rank: int, op: Action) -> tuple:
        return (rank,) if self.per_rank else (rank, op.peer)

    def post(self, rank: int, ops: tuple[Action, ...], t: float = 0.0) -> Item:
        """Rank `rank` posts `ops` (SEND / RECV actions) as one group at time t."""
        queues = tuple(dict.fromkeys(self._queue_key(rank, op) for op in ops))
        item = Item(rank, len(self.posted[rank]), tuple(ops), t, queues, op_done=[None] * len(ops))
        self.posted[rank].append(item)
        for q in queues:
            self.queues.setdefault(q, deque()).append(item)
        for i, op in enumerate(ops):
            self.item_of[(rank, op)] = item
            pair = (rank, op.peer) if op.kind == SEND else (op.peer, rank)
            mine, theirs = (self.sends, self.recvs) if op.kind == SEND else (self.recvs, self.sends)
            k = len(mine.setdefault(pair, []))
            mine[pair].append((item, i))
            other = theirs.get(pair, [])
            if k < len(other):
                self._match(item, i, *other[k])
        self._progress()
        return item

    def _match(self, item: Item, i: int, other: Item, j: int) -> None:
        self.partner[(id(item), i)] = (other, j)
        self.partner[(id(other), j)] = (item, i)
        a, b = item.ops[i], other.ops[j]
        if (a.what, a.stage, a.mb) != (b.what, b.stage, b.mb):
            send, recv = (a, b) if a.kind == SEND else (b, a)
            s_rank, r_rank = (item.rank, other.rank) if a.kind == SEND else (other.rank, item.rank)
            self.mismatches.append(f"rank {s_rank}'s {send} meets rank {r_rank}'s {recv} (p2p is matched in "
                                   f"posting order, not by name)")

    def _progress(self) -> None:
        changed = True
        while changed:
            changed = False
            for q in self.queues.values():
                head = q[0] if q else None
                if head is None or head.started is not None:
                    continue
                if all(self.queues[k][0] is head for k in head.queues):
                    head.started = max([head.posted] + [self.last_done[k] for k in head.queues
                                                         if k in self.last_done])
                    self.active.append(head)
                    changed = True
            for item in list(self.active):
                for i, t in enumerate(item.op_done):
                    if t is not None:
                        continue
                    other = self.partner.get((id(item), i))
                    if other is not None and other[0].started is not None:
                        done = max(item.started, other[0].started) + self.comm
                        item.op_done[i] = done
                        other[0].op_done[other[1]] = done
                if all(t is not None for t in item.op_done):
                    item.done = max(item.op_done)
                    self.active.remove(item)
                    for k in item.queues:
                        self.queues[k].popleft()
                        self.last_done[k] = item.done
                    changed = True

    def done_time(self, rank: int, op: Action) -> float | None:
        """When the group holding `op` (posted by `rank`) completed; None while it has not."""
        return self.item_of[(rank, op)].done

    def explain(self, rank: int) -> list[str]:
        """What holds up `rank`'s unfinished groups: for a deadlock message."""
        out = []
        for item in self.posted[rank]:
            if item.done is not None:
                continue
            if item.started is None:
                ahead = [self.queues[k][0] for k in item.queues if self.queues[k][0] is not item]
                out.append(f"{item} is queued behind {ahead[0]}" if ahead else f"{item} has not started")
                continue
            for i, op in enumerate(item.ops):
                if item.op_done[i] is not None:
                    continue
                other = self.partner.get((id(item), i))
                side = "receive" if op.kind == SEND else "send"
                if other is None:
                    out.append(f"rank {rank}'s {op} waits for rank {op.peer} to post the matching {side}")
                else:
                    out.append(f"rank {rank}'s {op} waits for {other[0]} to start")
        return out
