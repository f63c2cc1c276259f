"""Pipeline schedules as data: for every pipeline rank, the ordered list of actions it runs in one step.

A builder is a pure function of (pp ranks, chunks = micro-batches) that returns a `Schedule`; nothing here
knows about tensors or processes, so the same object is validated (`validate.py`), simulated
(`simulate.py`), drawn (`trace.py`), and lowered (`lower.py`) to the p2p program that the executor runs,
which the validator and simulator consume as well.

Vocabulary
- stage: a contiguous slice of the model's layers. Stages are numbered along the data flow of a
  micro-batch, 0 (embedding side) .. num_stages-1 (head and loss).
- chunk: the local index of a model slice held by a rank. 1F1B-like schedules hold one chunk (0).
  DualPipe: rank r of P holds stage r as chunk 0 and stage P-1-r as chunk 1; micro-batches
  [0, M/2) enter at rank 0 and run through chunk 0 copies (direction 0), micro-batches [M/2, M) enter at
  rank P-1 and run through chunk 1 copies (direction 1). The two copies of a stage must have their gradients
  summed after the step. DualPipeV: 2P stages, rank r holds stage r (chunk 0) and 2P-1-r (chunk 1).
- `routes[direction][stage] = (rank, chunk)` says where a stage of a micro-batch runs.

Action kinds
- F  forward of (stage, mb).  B  full backward.  I  input-gradient backward; its weight gradient is
  deferred to a later W of the same (stage, mb).  FB overlapped forward of (stage, mb) and full backward of
  (b_stage, b_mb), as DualPipe runs them.
- SEND / RECV: p2p of `what` ("act": output of `stage`'s forward, consumed by stage+1; "grad": input gradient
  made by `stage`'s backward, consumed by stage-1) for micro-batch `mb`, to / from rank `peer`.
  In a builder's (abstract) schedule: SEND is asynchronous, RECV blocks until the data has arrived.
  Messages between two ranks are matched in posting order (NCCL has no tags), so a rank's RECVs from a peer
  come in the order of that peer's SENDs to it. The builders put SENDs right after the compute that produced
  the data and RECVs right before the compute that needs them, hoisted earlier where that order requires it.
- POST / WAIT: the p2p program the executor runs, made from the abstract SEND / RECV by `lower.py`. POST
  carries `ops`, a group of SEND / RECV actions posted together (one batch_isend_irecv); WAIT carries the
  ops whose completion it waits for (before the compute that consumes a receive; every send at the end).
  A lowered schedule holds POST / WAIT and no bare SEND / RECV; the validator checks it under NCCL's p2p
  semantics (validate.py, p2p_model.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

F, B, BI, W, FB, SEND, RECV = "F", "B", "I", "W", "FB", "SEND", "RECV"  # BI: the "I" kind
POST, WAIT = "POST", "WAIT"
COMPUTE_KINDS = (F, B, BI, W, FB)
KINDS = COMPUTE_KINDS + (SEND, RECV, POST, WAIT)
ACT, GRAD = "act", "grad"
SCHEDULE_KINDS = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")

# DualPipe's eight phases, in order (the step loops of deepseek-ai/DualPipe's dualpipe.py).
DUALPIPE_PHASES = ("F0", "F0F1", "B1W1F1", "F0B1F1B0", "B1F1B0", "B1B0", "WB0", "W")


class ScheduleError(ValueError):
    """An invalid schedule or invalid builder arguments; the message names the problem."""


def layer_split(num_layers: int, num_stages: int) -> list[range]:
    """Layer ranges of each stage: L // S each, the L % S extra layers on interior stages first.

    Stages may be empty when L < S (an empty interior stage passes activations through unchanged)."""
    if num_stages < 1 or num_layers < 0:
        raise ValueError(f"need num_stages >= 1 and num_layers >= 0, got {num_stages}, {num_layers}")
    counts = [num_layers // num_stages] * num_stages
    order = list(range(1, num_stages - 1)) + [num_stages - 1, 0] if num_stages > 2 else list(range(num_stages))
    for i in range(num_layers % num_stages):
        counts[order[i]] += 1
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class Action:
    """One step of one rank's program. Fields that do not apply to a kind keep their default (-1 / "")."""

    kind: str
    stage: int
    mb: int
    chunk: int = 0
    b_stage: int = -1  # FB: the backward half
    b_mb: int = -1
    b_chunk: int = -1
    peer: int = -1  # SEND / RECV: the other rank
    what: str = ""  # SEND / RECV: ACT or GRAD
    phase: int = 0  # builder's phase tag (DualPipe: 1..8), informational only
    ops: tuple[Action, ...] = ()  # POST / WAIT: the SEND / RECV actions posted or waited for

    def __str__(self) -> str:
        if self.kind in (POST, WAIT):
            return f"{self.kind}[{', '.join(str(o) for o in self.ops)}]"
        if self.kind == FB:
            return f"FB(F{self.mb}@s{self.stage}|B{self.b_mb}@s{self.b_stage})"
        if self.kind in (SEND, RECV):
            arrow = "->" if self.kind == SEND else "<-"
            return f"{self.kind} {self.what} s{self.stage} mb{self.mb} {arrow} r{self.peer}"
        return f"{self.kind}{self.mb}@s{self.stage}"

    def computes(self) -> list[tuple[str, int, int, int]]:
        """The compute parts as (kind, stage, mb, chunk): FB splits into its F and B parts."""
        if self.kind == FB:
            return [(F, self.stage, self.mb, self.chunk), (B, self.b_stage, self.b_mb, self.b_chunk)]
        if self.kind in COMPUTE_KINDS:
            return [(self.kind, self.stage, self.mb, self.chunk)]
        return []


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the placement of stages on ranks."""

    kind: str
    pp: int
    chunks: int
    num_stages: int
    ranks: tuple[tuple[Action, ...], ...]
    routes: tuple[tuple[tuple[int, int], ...], ...]  # routes[direction][stage] = (rank, chunk)
    directions: tuple[int, ...]  # directions[mb]
    meta: dict = field(default_factory=dict, compare=False)

    def rank_of(self, stage: int, mb: int) -> int:
        return self.routes[self.directions[mb]][stage][0]

    def chunk_of(self, stage: int, mb: int) -> int:
        return self.routes[self.directions[mb]][stage][1]

    def stages_of(self, rank: int) -> dict[int, int]:
        """{chunk: stage} held by `rank` (DualPipe's mirrored copies appear on two ranks)."""
        held: dict[int, int] = {}
        for route in self.routes:
            for stage, (r, c) in enumerate(route):
                if r == rank:
                    held[c] = stage
        return dict(sorted(held.items()))

    def copies(self, stage: int) -> list[tuple[int, int]]:
        """Every (rank, chunk) holding `stage`: two for DualPipe, whose copies' gradients must be summed."""
        return sorted({route[stage] for route in self.routes})

    def microbatches_entering(self, rank: int) -> list[int]:
        """Micro-batches whose inputs this rank feeds in (stage 0 runs here)."""
        return [m for m in range(self.chunks) if self.rank_of(0, m) == rank]

    def microbatches_ending(self, rank: int) -> list[int]:
        """Micro-batches whose last stage (head, loss) runs on this rank."""
        return [m for m in range(self.chunks) if self.rank_of(self.num_stages - 1, m) == rank]

    @property
    def forward_only(self) -> bool:
        return bool(self.meta.get("forward_only"))

    @property
    def lowered(self) -> str | None:
        """The lowering that made this schedule's POST / WAIT program ("lockstep", "per-op"), or None for a
        builder's schedule with abstract SEND / RECV."""
        return self.meta.get("lowering")

    def compute_actions(self, rank: int) -> list[Action]:
        return [a for a in self.ranks[rank] if a.kind in COMPUTE_KINDS]

    def __str__(self) -> str:
        lines = [f"{self.kind} pp={self.pp} chunks={self.chunks} stages={self.num_stages}"]
        for r, acts in enumerate(self.ranks):
            lines.append(f"rank {r}: " + " ".join(str(a) for a in acts if a.kind in COMPUTE_KINDS))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- helpers

def _check_args(kind: str, pp: int, chunks: int) -> None:
    for name, v in (("pp", pp), ("chunks", chunks)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScheduleError(f"{kind}: {name} must be an int, got {v!r}")
    if pp < 1:
        raise ScheduleError(f"{kind}: pp (pipeline ranks) must be >= 1, got {pp}")
    if chunks < 1:
        raise ScheduleError(f"{kind}: chunks (micro-batches) must be >= 1, got {chunks}")


def _linear_routes(pp: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    return (tuple((s, 0) for s in range(pp)),)


def _assemble(kind: str, pp: int, chunks: int, num_stages: int, routes, directions, programs,
              meta: dict | None = None) -> Schedule:
    """Turn per-rank compute programs into full action lists by adding RECV before / SEND after compute."""

    def where(stage: int, mb: int) -> int:
        return routes[directions[mb]][stage][0]

    ranks = []
    for r, program in enumerate(programs):
        out: list[Action] = []
        for a in program:
            pre: list[Action] = []
            post: list[Action] = []
            for k, s, m, _c in a.computes():
                if k == F:
                    if s > 0 and (src := where(s - 1, m)) != r:
                        pre.append(Action(RECV, s - 1, m, peer=src, what=ACT, phase=a.phase))
                    if s < num_stages - 1 and (dst := where(s + 1, m)) != r:
                        post.append(Action(SEND, s, m, peer=dst, what=ACT, phase=a.phase))
                elif k in (B, BI):
                    if s < num_stages - 1 and (src := where(s + 1, m)) != r:
                        pre.append(Action(RECV, s + 1, m, peer=src, what=GRAD, phase=a.phase))
                    if s > 0 and (dst := where(s - 1, m)) != r:
                        post.append(Action(SEND, s, m, peer=dst, what=GRAD, phase=a.phase))
            out.extend(pre)
            out.append(a)
            out.extend(post)
        ranks.append(out)
    ranks = _order_receives(ranks)
    return Schedule(kind, pp, chunks, num_stages, tuple(tuple(acts) for acts in ranks), tuple(routes),
                    tuple(directions), meta or {})


def _p2p_key(a: Action) -> tuple[str, int, int]:
    return (a.what, a.stage, a.mb)


def _order_receives(ranks: list[list[Action]]) -> list[list[Action]]:
    """Hoist RECVs so that each rank receives from a peer in the order that peer sends to it.

    p2p messages between two ranks are matched in posting order (NCCL has no tags; tag-0 gloo likewise),
    so a receiver must post them in the sender's order. When a rank would first receive a message its peer
    sends later, the peer's earlier messages are received just before it. This never adds waiting (the
    earlier messages are sent first, so they arrive no later) and cannot deadlock for the same reason.
    """
    order: dict[tuple[int, int], list[tuple]] = {}
    for src, acts in enumerate(ranks):
        for a in acts:
            if a.kind == SEND:
                order.setdefault((src, a.peer), []).append(_p2p_key(a))
    out = []
    for dst, acts in enumerate(ranks):
        pending = {pair: 0 for pair in order if pair[1] == dst}  # next index expected from each peer
        recv_of = {(a.peer, _p2p_key(a)): a for a in acts if a.kind == RECV}
        done: set = set()
        new: list[Action] = []
        for a in acts:
            if a.kind != RECV:
                new.append(a)
                continue
            key = (a.peer, _p2p_key(a))
            if key in done:
                continue  # already hoisted
            seq = order.get((a.peer, dst), [])
            while pending.get((a.peer, dst), 0) < len(seq):
                nxt = (a.peer, seq[pending[(a.peer, dst)]])
                pending[(a.peer, dst)] += 1
                if nxt not in recv_of:
                    break  # no receive for it at all: the validator will report the unmatched SEND
                new.append(recv_of[nxt])
                done.add(nxt)
                if nxt == key:
                    break
            if key not in done:  # a receive nobody sends: keep it, the validator reports it
                new.append(a)
                done.add(key)
        out.append(new)
    return out


# -------------------------------------------------------------------------------------------- builders

def gpipe(pp: int, chunks: int) -> Schedule:
    """All forwards, then all backwards (peak activations = chunks on every rank)."""
    _check_args("gpipe", pp, chunks)
    programs = [[Action(F, r, m) for m in range(chunks)] + [Action(B, r, m) for m in range(chunks)]
                for r in range(pp)]
    return _assemble("gpipe", pp, chunks, pp, _linear_routes(pp), (0,) * chunks, programs)


def one_f_one_b(pp: int, chunks: int) -> Schedule:
    """1F1B: rank r runs pp-1-r warm-up forwards, then alternates one forward and one full backward."""
    _check_args("1f1b", pp, chunks)
    programs = []
    for r in range(pp):
        warm = min(pp - 1 - r, chunks)
        prog = [Action(F, r, m) for m in range(warm)]
        for i in range(chunks - warm):
            prog += [Action(F, r, warm + i), Action(B, r, i)]
        prog += [Action(B, r, m) for m in range(chunks - warm, chunks)]
        programs.append(prog)
    return _assemble("1f1b", pp, chunks, pp, _linear_routes(pp), (0,) * chunks, programs)


def zb1p(pp: int, chunks: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split into I and W.

    Rank r defers up to r weight gradients: the I-wave of the backward then runs at the speed of I alone,
    and the deferred W's fill the cool-down, where 1F1B would wait. A rank holds at most pp micro-batches'
    activations (activations stay alive until W), the same peak as 1F1B's rank 0.
    """
    _check_args("zb1p", pp, chunks)
    programs = []
    for r in range(pp):
        warm = min(pp - 1 - r, chunks)
        pending: deque[int] = deque()
        prog: list[Action] = [Action(F, r, m) for m in range(warm)]

        def backward(m: int, prog: list[Action] = prog, pending: deque[int] = pending, r: int = r) -> None:
            prog.append(Action(BI, r, m))
            pending.append(m)
            if len(pending) > r:
                prog.append(Action(W, r, pending.popleft()))

        for i in range(chunks - warm):
            prog.append(Action(F, r, warm + i))
            backward(i)
        for m in range(chunks - warm, chunks):
            backward(m)
        prog += [Action(W, r, m) for m in pending]
        programs.append(prog)
    return _assemble("zb1p", pp, chunks, pp, _linear_routes(pp), (0,) * chunks, programs)


def _dual_program(n: int, k: int, r: int, turn: bool) -> list[tuple]:
    """DualPipe's eight-phase program of one rank, in DeepSeek's notation.

    n: ranks per half (DualPipe: P/2; DualPipeV: P), k: micro-batches per direction (DualPipe: M/2;
    DualPipeV: M), r: the rank's index within its half, turn: the rank where the two directions meet
    (DualPipe's middle ranks, DualPipeV's last rank), which runs its first main-phase F and B unoverlapped.
    Items: (phase, "F", p) / (phase, "B"|"I", p) / (phase, "W") / (phase, "FB", p_forward, p_backward),
    where p is DeepSeek's per-rank phase index 0 / 1 (its two model chunks).
    """
    prog: list[tuple] = []
    prog += [(1, F, 0)] * ((n - r - 1) * 2)
    for _ in range(r + 1):
        prog += [(2, F, 0), (2, F, 1)]
    for _ in range(n - r - 1):
        prog += [(3, BI, 1), (3, W), (3, F, 1)]
    for i in range(k - 2 * n + r + 1):
        prog += [(4, F, 0), (4, B, 1)] if (i == 0 and turn) else [(4, FB, 0, 1)]
        prog.append((4, FB, 1, 0))
    for _ in range(n - r - 1):
        prog += [(5, B, 1), (5, FB, 1, 0)]
    steps, split = r + 1, False
    for i in range(steps):  # the second half of these backwards defer their weight gradients
        if i == steps // 2 and r % 2 == 1:
            split = True
        prog.append((6, BI if split else B, 1))
        if i == steps // 2 and r % 2 == 0:
            split = True
        prog.append((6, BI if split else B, 0))
    for _ in range(n - r - 1):
        prog += [(7, W), (7, BI, 0)]
    prog += [(8, W)] * (r + 1)
    return prog


def _lower_dual(prog: list[tuple], place) -> list[Action]:
    """Give each item of a DualPipe program its (stage, mb, chunk): forwards and backwards of each model chunk
    run their micro-batches in order; W's complete the deferred I's first-in first-out."""
    nf, nb = [0, 0], [0, 0]
    deferred: deque[tuple[int, int, int]] = deque()
    out: list[Action] = []

    def take(counter: list[int], p: int) -> tuple[int, int, int]:
        s, m, c = place(p, counter[p])
        counter[p] += 1
        return s, m, c

    for item in prog:
        phase, kind = item[0], item[1]
        if kind == F:
            s, m, c = take(nf, item[2])
            out.append(Action(F, s, m, c, phase=phase))
        elif kind in (B, BI):
            s, m, c = take(nb, item[2])
            out.append(Action(kind, s, m, c, phase=phase))
            if kind == BI:
                deferred.append((s, m, c))
        elif kind == W:
            if not deferred:
                raise ScheduleError("internal: W with no deferred weight gradient")
            s, m, c = deferred.popleft()
            out.append(Action(W, s, m, c, phase=phase))
        else:
            s, m, c = take(nf, item[2])
            bs, bm, bc = take(nb, item[3])
            out.append(Action(FB, s, m, c, b_stage=bs, b_mb=bm, b_chunk=bc, phase=phase))
    return out


def dualpipe(pp: int, chunks: int) -> Schedule:
    """DeepSeek's DualPipe: micro-batches enter from both ends; one's forward overlaps another's backward."""
    _check_args("dualpipe", pp, chunks)
    if pp % 2:
        raise ScheduleError(f"dualpipe needs an even number of pipeline ranks, got pp={pp}")
    if chunks % 2 or chunks < 2 * pp:
        raise ScheduleError(
            f"dualpipe needs an even number of chunks >= 2*pp = {2 * pp}, got chunks={chunks}")
    half, k = pp // 2, chunks // 2
    routes = (tuple((s, 0) for s in range(pp)), tuple((pp - 1 - s, 1) for s in range(pp)))
    directions = tuple(0 if m < k else 1 for m in range(chunks))
    programs = []
    for r in range(pp):
        second = r >= half
        hr = min(r, pp - 1 - r)

        def place(p: int, i: int, r: int = r, second: bool = second) -> tuple[int, int, int]:
            d = p ^ int(second)  # DeepSeek's phase index, flipped on the second half of the ranks
            return (r if d == 0 else pp - 1 - r), d * k + i, d

        prog = _dual_program(half, k, hr, turn=hr == half - 1)
        programs.append(_lower_dual(prog, place))
    return _assemble("dualpipe", pp, chunks, pp, routes, directions, programs, {"phases": DUALPIPE_PHASES})


def dualpipev(pp: int, chunks: int) -> Schedule:
    """DualPipeV: DualPipe cut in half; pp ranks hold 2*pp stages in a V (rank r: stages r and 2pp-1-r)."""
    _check_args("dualpipev", pp, chunks)
    if chunks < 2 * pp:
        raise ScheduleError(f"dualpipev needs chunks >= 2*pp = {2 * pp}, got chunks={chunks}")
    stages = 2 * pp
    routes = (tuple((s, 0) if s < pp else (stages - 1 - s, 1) for s in range(stages)),)
    programs = []
    for r in range(pp):

        def place(p: int, i: int, r: int = r) -> tuple[int, int, int]:
            return (r if p == 0 else stages - 1 - r), i, p

        programs.append(_lower_dual(_dual_program(pp, chunks, r, turn=r == pp - 1), place))
    return _assemble("dualpipev", pp, chunks, stages, routes, (0,) * chunks, programs,
                     {"phases": DUALPIPE_PHASES})


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def forward_only(schedule: Schedule) -> Schedule:
    """The same schedule without backward work, for inference through the pipeline (e.g. logits under pp).

    Forwards keep their order and placement; an FB becomes its F; B, I, W and gradient transfers go.
    Apply it before lowering (`lower(forward_only(s))`).
    """
    if schedule.lowered:
        raise ScheduleError("forward_only needs a builder's schedule, not a lowered one: lower(forward_only(s))")
    ranks = []
    for acts in schedule.ranks:
        out = []
        for a in acts:
            if a.kind == F or (a.kind in (SEND, RECV) and a.what == ACT):
                out.append(a)
            elif a.kind == FB:
                out.append(Action(F, a.stage, a.mb, a.chunk, phase=a.phase))
        ranks.append(tuple(out))
    meta = dict(schedule.meta, forward_only=True)
    return replace(schedule, ranks=tuple(ranks), meta=meta)


def build(kind: str, pp: int, chunks: int, check: bool = True) -> Schedule:
    """Schedule `kind` for `pp` pipeline ranks and `chunks` micro-batches, validated unless check=False."""
    if kind not in BUILDERS:
        raise ScheduleError(f"unknown schedule kind {kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")
    sched = BUILDERS[kind](pp, chunks)
    if check:
        from .validate import validate

        validate(sched)
    return sched


def phase_steps(schedule: Schedule) -> list[list[int]]:
    """Per rank, the number of steps in each of DualPipe's eight phases, counted from the actions.

    A step is one loop iteration of DeepSeek's algorithm: F0 = 1 forward, F0F1 = 2 forwards, B1W1F1 = one
    (I, W, F), main = two overlapped F&B (or F, B, F&B at the turn), B1F1B0 = (B, F&B), B1B0 = 2 backwards,
    WB0 = (W, backward), W = 1 weight gradient.
    """
    if schedule.kind not in ("dualpipe", "dualpipev"):
        raise ScheduleError(f"phase_steps applies to dualpipe / dualpipev, not {schedule.kind}")
    per_step = {1: 1, 2: 2, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2, 8: 1}
    rows = []
    for r in range(schedule.pp):
        units = [0] * 9
        for a in schedule.compute_actions(r):
            units[a.phase] += 1
        if units[4] and any(a.phase == 4 and a.kind != FB for a in schedule.compute_actions(r)):
            units[4] -= 1  # the turn rank's first main step is F, B, F&B: three actions for one step
        rows.append([units[p] // per_step[p] for p in range(1, 9)])
    return rows
