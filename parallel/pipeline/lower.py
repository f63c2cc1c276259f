"""Lowering: turn a builder's abstract SEND / RECV into the p2p program the executor posts (POST / WAIT).

Why. On NCCL the p2p ops between two ranks run one at a time in posting order, and a send does not finish
until the peer's matching receive runs (p2p_model.py). Posting each RECV alone and waiting for it at once,
and each SEND alone, deadlocks every schedule but GPipe: in 1F1B at pp=2, rank 0 posts send(act0),
send(act1), recv(grad0) while rank 1 posts recv(act0), send(grad0), recv(act1); after act0 both ranks'
next ops are sends whose receives are queued behind them. That program is still available as
`lower(s, "per-op")`, so that tests can show the validator and the NCCL emulation both reject it.

Lock-step lowering (`lower(s)`, the default):

1. One global order of all messages. The abstract program is executed once in a reference run (each rank
   runs its actions in order; a send never blocks; a receive waits for its send; among the ranks that can
   move, the one with the earliest clock under unit costs f=1, b=2, w=1 goes first) and the sends are
   numbered in the order they happen.
2. Every rank posts its ops in that order. A send is posted right after the compute that made its data.
   A receive x is posted right after the last of the rank's own sends numbered before x (at the start of
   the step if there is none), i.e. as early as the order allows, long before it is needed.
3. Ops posted at one point form groups: a run of sends plus the receive that follows them (DeepSeek's
   "send this chunk's outputs with the next chunk's receives"); further receives at that point go alone, so
   that waiting for a receive never waits for a receive numbered after it.
4. A WAIT for each receive goes right before the compute that consumes it; one WAIT for all sends ends the
   step.

Why it cannot deadlock (for every schedule the abstract validator accepts): (a) a receive's posting
point precedes its consumer: the rank's sends numbered before x happened, in the reference run, before x
was sent and therefore before x's consumer ran; a rank runs its actions in order. (b) Every rank's ops
are a subsequence of the one global order, and groups are contiguous pieces of it; so the first
unfinished message, once both ends have posted it, has nothing unfinished ahead of it in any queue it
sits in (per pair or per rank) and completes; by induction every posted message completes without any
host action. (c) Replay the reference run: when it reaches a consumer of x, every message numbered up to x
has been sent, and each of their receivers has passed the send after which it posts the receive, so all
of them are posted at both ends and complete by (b); the WAIT before the consumer (its group holds only
messages up to x) returns. So every rank gets through its program in the order of the reference run.
The validator re-checks every lowered program against the model of p2p_model.py (per pair, and per rank).
"""

from __future__ import annotations

from dataclasses import replace

from .schedule import ACT, BI, COMPUTE_KINDS, GRAD, POST, RECV, SEND, WAIT, Action, B, F, Schedule, ScheduleError

LOWERINGS = ("lockstep", "per-op")
# Unit costs of the reference run; they only decide how early receives are posted, never correctness.
_REF_COST = {F: 1.0, B: 2.0, BI: 1.0, "W": 1.0, "FB": 3.0}


def _msg(rank: int, a: Action) -> tuple:
    """(src, dst, what, stage, mb) of a SEND or RECV action on `rank`."""
    src, dst = (rank, a.peer) if a.kind == SEND else (a.peer, rank)
    return (src, dst, a.what, a.stage, a.mb)


def message_order(schedule: Schedule) -> list[tuple]:
    """Every message (src, dst, what, stage, mb) in the order its send happens in a reference run of the
    abstract program (see the module docstring)."""
    pp = schedule.pp
    pc, clock = [0] * pp, [0.0] * pp
    sent: dict[tuple, float] = {}
    order: list[tuple] = []
    while True:
        best, best_t = -1, 0.0
        for r in range(pp):
            acts = schedule.ranks[r]
            if pc[r] >= len(acts):
                continue
            a = acts[pc[r]]
            t = clock[r]
            if a.kind == RECV:
                arrival = sent.get(_msg(r, a))
                if arrival is None:
                    continue
                t = max(t, arrival)
            if best < 0 or t < best_t:
                best, best_t = r, t
        if best < 0:
            break
        a = schedule.ranks[best][pc[best]]
        clock[best] = best_t
        if a.kind == SEND:
            sent[_msg(best, a)] = best_t
            order.append(_msg(best, a))
        elif a.kind in COMPUTE_KINDS:
            clock[best] += _REF_COST[a.kind]
        pc[best] += 1
    stuck = [r for r in range(pp) if pc[r] < len(schedule.ranks[r])]
    if stuck:
        raise ScheduleError(f"cannot lower {schedule.kind}: its abstract program deadlocks (ranks {stuck}); "
                            "run validate() on it")
    return order


def _inputs(a: Action, num_stages: int) -> list[tuple[str, int, int]]:
    """(what, stage, mb) of the data a compute action consumes from a neighbouring stage."""
    out = []
    for k, s, m, _c in a.computes():
        if k == F and s > 0:
            out.append((ACT, s - 1, m))
        elif k in (B, BI) and s < num_stages - 1:
            out.append((GRAD, s + 1, m))
    return out


def _groups(seq: list[Action]) -> list[Action]:
    """Ops posted at one point -> POSTs: runs of sends, each closed by at most one receive."""
    posts, cur = [], []
    for op in seq:
        cur.append(op)
        if op.kind == RECV:
            posts.append(Action(POST, -1, -1, ops=tuple(cur)))
            cur = []
    if cur:
        posts.append(Action(POST, -1, -1, ops=tuple(cur)))
    return posts


def _lower_rank_lockstep(schedule: Schedule, rank: int, index: dict[tuple, int]) -> list[Action]:
    acts = schedule.ranks[rank]
    recv_of = {(a.what, a.stage, a.mb): a for a in acts if a.kind == RECV}
    incoming = sorted((a for a in recv_of.values()), key=lambda a: index[_msg(rank, a)])
    send_idx = [index[_msg(rank, a)] for a in acts if a.kind == SEND]
    out: list[Action] = []
    seq: list[Action] = []  # ops due at the current point, in global order
    nxt_recv, nxt_send = 0, 0
    posted: set[Action] = set()

    def post_receives_before(limit: float) -> None:
        nonlocal nxt_recv
        while nxt_recv < len(incoming) and index[_msg(rank, incoming[nxt_recv])] < limit:
            seq.append(incoming[nxt_recv])
            nxt_recv += 1

    def flush() -> None:
        out.extend(_groups(seq))
        posted.update(seq)
        seq.clear()

    post_receives_before(send_idx[0] if send_idx else float("inf"))
    sends: list[Action] = []
    for a in acts:
        if a.kind == RECV:
            continue  # posted early above; waited right before its consumer below
        if a.kind == SEND:
            seq.append(a)
            sends.append(a)
            nxt_send += 1
            post_receives_before(send_idx[nxt_send] if nxt_send < len(send_idx) else float("inf"))
            continue
        flush()
        need = [recv_of[k] for k in _inputs(a, schedule.num_stages) if k in recv_of]
        for op in need:
            if op not in posted:
                raise ScheduleError(f"internal: rank {rank} consumes {op} before posting it")
        if need:
            out.append(Action(WAIT, -1, -1, ops=tuple(need)))
        out.append(a)
    flush()
    if sends:
        out.append(Action(WAIT, -1, -1, ops=tuple(sends)))
    return out


def _lower_rank_per_op(acts: tuple[Action, ...]) -> list[Action]:
    out: list[Action] = []
    sends = []
    for a in acts:
        if a.kind == RECV:
            out += [Action(POST, -1, -1, ops=(a,)), Action(WAIT, -1, -1, ops=(a,))]
        elif a.kind == SEND:
            out.append(Action(POST, -1, -1, ops=(a,)))
            sends.append(a)
        else:
            out.append(a)
    if sends:
        out.append(Action(WAIT, -1, -1, ops=tuple(sends)))
    return out


def lower(schedule: Schedule, how: str = "lockstep", check: bool = True) -> Schedule:
    """The POST / WAIT program of `schedule` (a builder's schedule). how="lockstep" (default, cannot deadlock
    under NCCL's semantics, see the module docstring) or "per-op" (each SEND / RECV posted alone, each
    RECV waited at once: the executor's posting before lowering, which deadlocks on NCCL). With check=True
    a lock-step program is validated (validate.py), so one that could hang raises here; a per-op program
    is returned unchecked (it exists to be rejected: validate() it to see why)."""
    if how not in LOWERINGS:
        raise ScheduleError(f"unknown lowering {how!r}; valid: {', '.join(LOWERINGS)}")
    if schedule.lowered:
        raise ScheduleError(f"schedule is already lowered ({schedule.lowered})")
    if how == "per-op":
        ranks = [_lower_rank_per_op(acts) for acts in schedule.ranks]
    else:
        index = {m: i for i, m in enumerate(message_order(schedule))}
        ranks = [_lower_rank_lockstep(schedule, r, index) for r in range(schedule.pp)]
    out = replace(schedule, ranks=tuple(tuple(acts) for acts in ranks), meta=dict(schedule.meta, lowering=how))
    if check and how == "lockstep":
        from .validate import validate

        validate(out)
    return out
