"""Schedule validator: complete, placed right, dependencies respected, sends matched, no deadlock.

Two kinds of program, two semantics:
- A builder's schedule (abstract SEND / RECV): SEND asynchronous, RECV blocks until its SEND has run. This
  proves the dependency structure; it is what the lowering starts from, not what runs.
- A lowered schedule (POST / WAIT, lower.py): exactly what the executor posts, run under NCCL's p2p
  semantics (p2p_model.py): per rank pair a FIFO of posted groups, ops of a group progressing together,
  sends that finish only when the peer's receive has started. `per_rank_queue=True` checks the stricter
  reading with one queue per rank for all its peers.
The deadlock check runs all programs: ranks advance while they can; a rank left blocked forever is a
deadlock, reported with what each stuck rank waits for. A compute action whose input is not on its rank
when its turn comes (never received or not yet waited for, or its forward not yet run) is a dependency
error, since nothing later in the program can supply it.
"""

from __future__ import annotations

from collections import Counter

from .p2p_model import P2PModel
from .schedule import (
    ACT,
    BI,
    COMPUTE_KINDS,
    FB,
    GRAD,
    KINDS,
    POST,
    RECV,
    SEND,
    WAIT,
    Action,
    B,
    F,
    Schedule,
    ScheduleError,
    W,
)

_MAX_LISTED = 6


def _fail(problems: list[str], schedule: Schedule) -> None:
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise ScheduleError(f"invalid {schedule.kind} schedule (pp={schedule.pp}, chunks={schedule.chunks}): "
                            + "; ".join(problems[:_MAX_LISTED]) + more)


def _check_shape(s: Schedule) -> list[str]:
    problems = []
    if len(s.ranks) != s.pp:
        problems.append(f"{len(s.ranks)} action lists for pp={s.pp} ranks")
    if len(s.directions) != s.chunks:
        problems.append(f"{len(s.directions)} micro-batch directions for {s.chunks} chunks")
    for route in s.routes:
        if len(route) != s.num_stages:
            problems.append(f"a route has {len(route)} stages, expected {s.num_stages}")
    if problems:
        return problems
    bare, lowered = (SEND, RECV), (POST, WAIT)
    what = "a lowered schedule" if s.lowered else "a builder's schedule"
    for r, acts in enumerate(s.ranks):
        for a in acts:
            if a.kind not in KINDS:
                problems.append(f"rank {r}: unknown action kind {a.kind!r}")
                continue
            if a.kind in (lowered if not s.lowered else bare):
                problems.append(f"rank {r}: {a} in {what} (a builder's has SEND / RECV, a lowered one "
                                "POST / WAIT)")
                continue
            if a.kind in lowered:
                if not a.ops or any(o.kind not in bare for o in a.ops):
                    problems.append(f"rank {r}: {a} must carry SEND / RECV ops")
                    continue
                problems += [f"rank {r}: {a}: {p}" for o in a.ops for p in _check_p2p(s, r, o)]
                continue
            pairs = [(a.stage, a.mb)] + ([(a.b_stage, a.b_mb)] if a.kind == FB else [])
            if any(not (0 <= st < s.num_stages and 0 <= m < s.chunks) for st, m in pairs):
                problems.append(f"rank {r}: {a} names a stage or micro-batch out of range")
                continue
            if a.kind in (SEND, RECV):
                problems += [f"rank {r}: {p}" for p in _check_p2p(s, r, a)]
                continue
            for _k, st, m, c in a.computes():
                if (s.rank_of(st, m), s.chunk_of(st, m)) != (r, c):
                    problems.append(f"rank {r}: {a} belongs on rank {s.rank_of(st, m)} "
                                    f"chunk {s.chunk_of(st, m)}")
    return problems


def _check_p2p(s: Schedule, r: int, a: Action) -> list[str]:
    if not (0 <= a.stage < s.num_stages and 0 <= a.mb < s.chunks):
        return [f"{a} names a stage or micro-batch out of range"]
    if a.what not in (ACT, GRAD) or not (0 <= a.peer < s.pp) or a.peer == r:
        return [f"{a} has a bad peer or payload"]
    return []


def _p2p_ops(acts) -> list[Action]:
    """The SEND / RECV ops of a program in posting order (bare, or inside POSTs)."""
    out = []
    for a in acts:
        if a.kind in (SEND, RECV):
            out.append(a)
        elif a.kind == POST:
            out.extend(a.ops)
    return out


def _check_complete(s: Schedule) -> list[str]:
    counts: Counter = Counter()
    for acts in s.ranks:
        for a in acts:
            for k, st, m, _c in a.computes():
                counts[(k, st, m)] += 1
    problems = []
    for st in range(s.num_stages):
        for m in range(s.chunks):
            nf, nb, ni, nw = (counts[(k, st, m)] for k in (F, B, BI, W))
            if nf != 1:
                problems.append(f"stage {st} mb {m}: {nf} forwards (need exactly 1)")
            if s.forward_only:
                if nb + ni + nw:
                    problems.append(f"stage {st} mb {m}: backward work in a forward-only schedule")
            elif not ((nb, ni, nw) == (1, 0, 0) or (nb, ni, nw) == (0, 1, 1)):
                problems.append(f"stage {st} mb {m}: {nb} B, {ni} I, {nw} W (need one B, or one I and one W)")
    return problems


def _check_matching(s: Schedule) -> list[str]:
    sends: Counter = Counter()
    recvs: Counter = Counter()
    problems = []
    ops = [_p2p_ops(acts) for acts in s.ranks]
    for r in range(s.pp):
        for a in ops[r]:
            src, dst = (r, a.peer) if a.kind == SEND else (a.peer, r)
            nxt = a.stage + 1 if a.what == ACT else a.stage - 1
            if not 0 <= nxt < s.num_stages:
                problems.append(f"rank {r}: {a}: stage {a.stage}'s {a.what} has no consumer stage")
                continue
            if s.rank_of(a.stage, a.mb) != src or s.rank_of(nxt, a.mb) != dst:
                problems.append(f"rank {r}: {a}: {a.what} of stage {a.stage} mb {a.mb} goes from rank "
                                f"{s.rank_of(a.stage, a.mb)} to rank {s.rank_of(nxt, a.mb)}")
            (sends if a.kind == SEND else recvs)[(src, dst, a.what, a.stage, a.mb)] += 1
    for key in sorted(set(sends) | set(recvs)):
        if sends[key] != 1 or recvs[key] != 1:
            src, dst, what, st, m = key
            problems.append(f"{what} of stage {st} mb {m} rank {src}->{dst}: "
                            f"{sends[key]} SEND, {recvs[key]} RECV (need one each)")
    if problems:
        return problems
    # p2p messages between two ranks are matched in posting order: the receiver must follow the sender's
    for src in range(s.pp):
        for dst in range(s.pp):
            sent = [(a.what, a.stage, a.mb) for a in ops[src] if a.kind == SEND and a.peer == dst]
            got = [(a.what, a.stage, a.mb) for a in ops[dst] if a.kind == RECV and a.peer == src]
            for i, (x, y) in enumerate(zip(sent, got)):
                if x != y:
                    problems.append(f"p2p order rank {src}->{dst}: message {i} is sent as {x[0]} of stage "
                                    f"{x[1]} mb {x[2]} but received as {y[0]} of stage {y[1]} mb {y[2]}")
                    break
    return problems



class _Data:
    """What each rank holds while the programs run: data present, compute done; checks a compute's inputs."""

    def __init__(self, s: Schedule) -> None:
        self.s = s
        self.have: list[set] = [set() for _ in range(s.pp)]  # (what, stage, mb) present on a rank
        self.done: list[set] = [set() for _ in range(s.pp)]  # (kind, stage, mb) computed on a rank
        self.problems: list[str] = []

    def need(self, r: int, a: Action, item: tuple, why: str) -> bool:
        if item in self.have[r] or item in self.done[r]:
            return True
        self.problems.append(f"rank {r}: {a} runs before {why}")
        return False

    def produced(self, r: int, a: Action, op: Action) -> bool:
        return self.need(r, a, (op.what, op.stage, op.mb),
                         f"{op.what} of stage {op.stage} mb {op.mb} is computed on this rank")

    def compute(self, r: int, a: Action) -> bool:
        ok = True
        for k, st, m, _c in a.computes():
            if k == F:
                if st > 0:
                    ok &= self.need(r, a, (ACT, st - 1, m), f"the activation of stage {st - 1} mb {m} is on this rank")
                self.done[r].add((F, st, m))
                self.have[r].add((ACT, st, m))
            elif k in (B, BI):
                ok &= self.need(r, a, (F, st, m), "its forward")
                if st < self.s.num_stages - 1:
                    ok &= self.need(r, a, (GRAD, st + 1, m),
                                    f"the gradient from stage {st + 1} mb {m} is on this rank")
                self.done[r].add((k, st, m))
                self.have[r].add((GRAD, st, m))
            elif k == W:
                ok &= self.need(r, a, (BI, st, m), "its input-gradient backward (I)")
                self.done[r].add((W, st, m))
        return ok


def _run(s: Schedule, step, computes: int | None = None, rounds: list | None = None) -> list[int] | None:
    """Advance every rank's program while some rank can. `step(rank, action)` returns True (done: go on),
    False (blocked here for now) or None (it recorded a problem: stop, and return None). Returns each rank's
    final position (a rank short of its program's end is stuck). With `computes`, a rank runs at most that
    many compute actions per round, and `rounds` receives every rank's position after each round."""
    pc = [0] * s.pp
    progress = True
    while progress:
        progress = False
        for r in range(s.pp):
            budget = computes
            while pc[r] < len(s.ranks[r]):
                a = s.ranks[r][pc[r]]
                if budget == 0 and a.kind in COMPUTE_KINDS:
                    break
                ok = step(r, a)
                if ok is None:
                    return None
                if not ok:
                    break
                pc[r] += 1
                progress = True
                if budget is not None and a.kind in COMPUTE_KINDS:
                    budget -= 1
        if rounds is not None and progress:
            rounds.append(list(pc))
    return pc


def _stuck(s: Schedule, pc: list[int]) -> list[str]:
    return [f"rank {r} waits at action {pc[r]} ({s.ranks[r][pc[r]]})" for r in range(s.pp) if pc[r] < len(s.ranks[r])]


def _walk(s: Schedule) -> list[str]:
    """A builder's program with asynchronous SENDs and blocking RECVs: dependency violations and deadlock."""
    data = _Data(s)
    sent: set = set()

    def step(r: int, a: Action) -> bool | None:
        if a.kind == SEND:
            if not data.produced(r, a, a):
                return None
            sent.add((r, a.peer, a.what, a.stage, a.mb))
        elif a.kind == RECV:
            if (a.peer, r, a.what, a.stage, a.mb) not in sent:
                return False
            data.have[r].add((a.what, a.stage, a.mb))
        elif not data.compute(r, a):
            return None
        return True

    pc = _run(s, step)
    if pc is not None and _stuck(s, pc):
        data.problems.append("deadlock: " + ", ".join(_stuck(s, pc)))
    return data.problems


def _walk_lowered(s: Schedule, per_rank_queue: bool = False, computes: int | None = None,
                  rounds: list | None = None) -> list[str]:
    """A lowered program under NCCL's p2p semantics (p2p_model.py): dependency violations, ops posted or
    waited wrongly, and deadlock (`computes`, `rounds`: as for `_run`)."""
    model = P2PModel(s.pp, per_rank=per_rank_queue)
    data = _Data(s)
    posted: list[set] = [set() for _ in range(s.pp)]
    waited: list[set] = [set() for _ in range(s.pp)]
    problems = data.problems

    def step(r: int, a: Action) -> bool | None:
        if a.kind == POST:
            for op in a.ops:
                if op in posted[r]:
                    problems.append(f"rank {r}: {a} posts {op} a second time")
                elif op.kind == SEND:
                    data.produced(r, a, op)  # records a problem if the data is not here yet
            if problems:
                return None
            posted[r].update(a.ops)
            model.post(r, a.ops)
            if model.mismatches:
                problems.extend(model.mismatches)
                return None
        elif a.kind == WAIT:
            for op in a.ops:
                if op not in posted[r] or op in waited[r]:
                    problems.append(f"rank {r}: {a} waits for {op}, which it "
                                    + ("waited for already" if op in waited[r] else "has not posted"))
            if problems:
                return None
            if any(model.done_time(r, op) is None for op in a.ops):
                return False
            waited[r].update(a.ops)
            data.have[r].update((op.what, op.stage, op.mb) for op in a.ops if op.kind == RECV)
        elif not data.compute(r, a):
            return None
        return True

    pc = _run(s, step, computes, rounds)
    if pc is None:
        return problems
    stuck = [r for r in range(s.pp) if pc[r] < len(s.ranks[r])]
    if stuck:
        why = [w for r in stuck for w in model.explain(r)]
        queue = "per rank" if per_rank_queue else "per rank pair"
        problems.append(f"deadlock under NCCL p2p semantics (posted groups in order {queue}, sends finish only "
                        "when the receive has started): " + ", ".join(_stuck(s, pc))
                        + ("; " + "; ".join(why[:4]) if why else ""))
        return problems
    for r in range(s.pp):
        left = [op for op in _p2p_ops(s.ranks[r]) if op not in waited[r]]
        if left:
            problems.append(f"rank {r}: posts {left[0]} but never waits for it"
                            + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    return problems


def slices(schedule: Schedule, computes: int = 1) -> list[list[int]]:
    """Consistent cuts of a lowered program, for running a step in slices with other work between them:
    slice k takes every rank from its position after slice k-1 to `cuts[k][rank]`. The cuts come from a
    valid execution under NCCL's p2p semantics in which each rank runs at most `computes` compute actions
    per round, so whatever a rank needs before its k-th cut (a received activation, a matched send) other
    ranks produce before theirs: every rank reaches its cut without waiting for a later slice. At a cut no
    all-to-all is in flight (a compute action completes its own); p2p may be, on the step's own group."""
    if not schedule.lowered:
        raise ScheduleError("slices needs a lowered schedule (parallel.pipeline.lower)")
    rounds: list = []
    problems = _walk_lowered(schedule, computes=computes, rounds=rounds)
    _fail(problems, schedule)
    return rounds


def validate(schedule: Schedule, per_rank_queue: bool = False) -> None:
    """Raise ScheduleError naming what is wrong, or return None for a valid schedule.

    A lowered schedule (lower.py) is run under NCCL's p2p semantics, so passing proves that the program
    the executor posts cannot deadlock there; per_rank_queue=True uses one queue per rank for all peers
    instead of one per rank pair (stricter). A builder's schedule is run with asynchronous sends.
    """
    for check in (_check_shape, _check_complete, _check_matching):
        _fail(check(schedule), schedule)
    if schedule.lowered:
        _fail(_walk_lowered(schedule, per_rank_queue), schedule)
    else:
        _fail(_walk(schedule), schedule)
