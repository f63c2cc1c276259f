"""Schedule validator: complete, placed right, dependencies respected, sends matched, no deadlock.

The deadlock check runs the programs with the blocking semantics the executor uses (SEND asynchronous,
RECV blocks until its SEND has run): ranks advance while they can; if some rank is left blocked forever the
schedule deadlocks. A compute action whose input is not on its rank when its turn comes (never received,
or its forward not yet run) is a dependency error, since nothing later in the program can supply it.
"""

from __future__ import annotations

from collections import Counter

from .schedule import ACT, BI, FB, GRAD, KINDS, RECV, SEND, Action, B, F, Schedule, ScheduleError, W

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
    for r, acts in enumerate(s.ranks):
        for a in acts:
            if a.kind not in KINDS:
                problems.append(f"rank {r}: unknown action kind {a.kind!r}")
                continue
            pairs = [(a.stage, a.mb)] + ([(a.b_stage, a.b_mb)] if a.kind == FB else [])
            if any(not (0 <= st < s.num_stages and 0 <= m < s.chunks) for st, m in pairs):
                problems.append(f"rank {r}: {a} names a stage or micro-batch out of range")
                continue
            if a.kind in (SEND, RECV):
                if a.what not in (ACT, GRAD) or not (0 <= a.peer < s.pp) or a.peer == r:
                    problems.append(f"rank {r}: {a} has a bad peer or payload")
                continue
            for _k, st, m, c in a.computes():
                if (s.rank_of(st, m), s.chunk_of(st, m)) != (r, c):
                    problems.append(f"rank {r}: {a} belongs on rank {s.rank_of(st, m)} "
                                    f"chunk {s.chunk_of(st, m)}")
    return problems


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
    for r, acts in enumerate(s.ranks):
        for a in acts:
            if a.kind not in (SEND, RECV):
                continue
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
            sent = [(a.what, a.stage, a.mb) for a in s.ranks[src] if a.kind == SEND and a.peer == dst]
            got = [(a.what, a.stage, a.mb) for a in s.ranks[dst] if a.kind == RECV and a.peer == src]
            for i, (x, y) in enumerate(zip(sent, got)):
                if x != y:
                    problems.append(f"p2p order rank {src}->{dst}: message {i} is sent as {x[0]} of stage "
                                    f"{x[1]} mb {x[2]} but received as {y[0]} of stage {y[1]} mb {y[2]}")
                    break
    return problems


def _walk(s: Schedule, rendezvous: bool = False) -> list[str]:
    """Run all programs with blocking RECVs; report dependency violations and deadlock.

    rendezvous=True models NCCL: each run of adjacent SEND/RECV actions is one batch_isend_irecv group that
    completes only once the peers have posted the matching halves of all its messages.
    """
    pc = [0] * s.pp
    posted: set = set()  # (kind, src, dst, what, stage, mb) of posted p2p halves (rendezvous mode)
    have: list[set] = [set() for _ in range(s.pp)]  # (what, stage, mb) present on a rank
    done: list[set] = [set() for _ in range(s.pp)]  # (kind, stage, mb) computed on a rank
    sent: set = set()
    problems: list[str] = []

    def need(r: int, a: Action, item: tuple, why: str) -> bool:
        if item in have[r] or item in done[r]:
            return True
        problems.append(f"rank {r}: {a} runs before {why}")
        return False

    def run(r: int, a: Action) -> bool:
        if a.kind == SEND:
            key = (r, a.peer, a.what, a.stage, a.mb)
            if not need(r, a, (a.what, a.stage, a.mb),
                        f"{a.what} of stage {a.stage} mb {a.mb} is computed on this rank"):
                return False
            sent.add(key)
            return True
        if a.kind == RECV:
            return True
        ok = True
        for k, st, m, _c in a.computes():
            if k == F:
                if st > 0:
                    ok &= need(r, a, (ACT, st - 1, m),
                               f"the activation of stage {st - 1} mb {m} is on this rank")
                done[r].add((F, st, m))
                have[r].add((ACT, st, m))
            elif k in (B, BI):
                ok &= need(r, a, (F, st, m), "its forward")
                if st < s.num_stages - 1:
                    ok &= need(r, a, (GRAD, st + 1, m),
                               f"the gradient from stage {st + 1} mb {m} is on this rank")
                done[r].add((k, st, m))
                have[r].add((GRAD, st, m))
            elif k == W:
                ok &= need(r, a, (BI, st, m), "its input-gradient backward (I)")
                done[r].add((W, st, m))
        return ok

    progress = True
    while progress:
        progress = False
        for r in range(s.pp):
            acts = s.ranks[r]
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if rendezvous and a.kind in (SEND, RECV):
                    end = pc[r]
                    while end < len(acts) and acts[end].kind in (SEND, RECV):
                        end += 1
                    group = acts[pc[r]:end]
                    halves = [(g.kind, *((r, g.peer) if g.kind == SEND else (g.peer, r)), g.what, g.stage, g.mb)
                              for g in group]
                    posted.update(halves)
                    other = {SEND: RECV, RECV: SEND}
                    if not all((other[h[0]], *h[1:]) in posted for h in halves):
                        break
                    for g in group:
                        if g.kind == SEND and not run(r, g):
                            return problems
                        if g.kind == RECV:
                            have[r].add((g.what, g.stage, g.mb))
                    pc[r] = end
                    progress = True
                    continue
                if a.kind == RECV:
                    key = (a.peer, r, a.what, a.stage, a.mb)
                    if key not in sent:
                        break
                    have[r].add((a.what, a.stage, a.mb))
                elif not run(r, a):
                    return problems
                pc[r] += 1
                progress = True
    stuck = [f"rank {r} waits at action {pc[r]} ({s.ranks[r][pc[r]]})"
             for r in range(s.pp) if pc[r] < len(s.ranks[r])]
    if stuck:
        problems.append("deadlock: " + ", ".join(stuck))
    return problems


def validate(schedule: Schedule, rendezvous: bool = False) -> None:
    """Raise ScheduleError naming what is wrong, or return None for a valid schedule.

    rendezvous=True also proves freedom from deadlock when every run of adjacent SEND/RECV actions is posted
    as one batch_isend_irecv whose sends complete only when the peer posts the receive (NCCL's behaviour).
    """
    for check in (_check_shape, _check_complete, _check_matching, _walk):
        _fail(check(schedule), schedule)
    if rendezvous:
        _fail(_walk(schedule, rendezvous=True), schedule)
