"""Event-driven simulator of a pipeline schedule: timeline, per-rank busy time, bubble, peak activations.

Stable API (the layout planner calls it to predict step time)::

    from parallel.pipeline import build
    from parallel.pipeline.simulate import Costs, simulate
    res = simulate(build("dualpipev", pp=4, chunks=10), Costs(f=1, b=2, w=1, fb=2.5, comm=0.1))
    res.makespan, res.worst_bubble, res.ranks[r].busy / .bubble / .peak_activations, res.chrome_trace()

Costs are in any one time unit (the Chrome trace writes 1 unit as 1 ms). New cost fields are added only with
defaults, so `Costs(f=.., b=.., w=.., fb=.., comm=..)` keeps working. `stage_scale` (one factor per stage)
models uneven stages, such as a first stage with the embedding or a last one with head, loss and MTP.

Model. Every rank runs its actions in order, one at a time. A compute action occupies its rank for its cost:
F = f + a2a_f, B = b + a2a_b, I = b - w + a2a_b, W = w, FB = fb (defaults to F + B: no overlap gain).
A SEND takes no rank time; its data reaches the peer `comm` later. A RECV waits for that arrival. The
step starts at 0 on every rank and ends when the last rank finishes (the makespan).
A lowered schedule (POST / WAIT, lower.py) is timed under NCCL's p2p semantics (p2p_model.py): a POST takes
no rank time; a posted group starts when the groups ahead of it in its rank-pair queues have finished; a
message completes `comm` after both its send's and its receive's groups have started; a WAIT holds its
rank until the groups of the ops it names have finished. So `comm` also prices the rendezvous.

Bubble (what is compared with the DualPipe README table): a rank's bubble is its idle time within the
step, `makespan - busy`, where busy is the summed cost of its compute actions (an FB counts once, at fb).
Every rank holds the pipeline for the whole step, so time a rank spends finished while others still work is
bubble too. With comm = 0 this is the quantity the README formulas count: e.g. 1F1B's (PP-1)(F+B) is
exactly `makespan - M(F+B)` on every rank. We report the worst (largest) rank's bubble.

Peak activations: the largest number of (stage, micro-batch) activation sets a rank holds at once; one is
taken when a forward starts and released when its full backward (B) ends, or, when the backward is split,
when its W ends (W still needs the layer inputs). Within an FB the forward's set is taken before the
backward's is released. A forward-only schedule releases each set when its forward ends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .p2p_model import P2PModel
from .schedule import BI, FB, POST, RECV, SEND, WAIT, B, F, Schedule, ScheduleError, W


@dataclass(frozen=True)
class Costs:
    """Time of one action of one stage chunk; fb=None means F + B (the overlap hides nothing)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0
    a2a_f: float = 0.0  # exposed all-to-all time of a standalone F (hidden inside an FB)
    a2a_b: float = 0.0  # exposed all-to-all time of a standalone B or I
    # Per-stage multiplier of compute time (e.g. the embedding or head stage is heavier); an FB is scaled by
    # the mean of its two stages' factors. None: all stages cost the same.
    stage_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.stage_scale is not None:
            scale = tuple(self.stage_scale)
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0
                   for x in scale):
                raise ScheduleError(f"stage_scale must hold finite numbers > 0, got {self.stage_scale!r}")
            object.__setattr__(self, "stage_scale", scale)
        for f_ in fields(self):
            v = getattr(self, f_.name)
            if f_.name == "stage_scale" or (v is None and f_.name == "fb"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ScheduleError(f"cost {f_.name} must be a finite number >= 0, got {v!r}")
        if self.w > self.b:
            raise ScheduleError(f"cost w (weight-grad part of B) must not exceed b: w={self.w} b={self.b}")

    @classmethod
    def names(cls) -> list[str]:
        """The scalar cost fields (what `moerun schedule --cost` accepts)."""
        return [f_.name for f_ in fields(cls) if f_.name != "stage_scale"]

    def action_time(self, action) -> float:
        """Rank time of one compute action, with its stage's scale factor."""
        d = self.duration(action.kind)
        if self.stage_scale is None:
            return d
        n = len(self.stage_scale)
        stages = [action.stage] + ([action.b_stage] if action.kind == FB else [])
        if any(s >= n for s in stages):
            raise ScheduleError(f"stage_scale has {n} entries; the schedule has a stage {max(stages)}")
        return d * sum(self.stage_scale[s] for s in stages) / len(stages)

    def duration(self, kind: str) -> float:
        """Rank time of one compute action of `kind`."""
        if kind == F:
            return self.f + self.a2a_f
        if kind == B:
            return self.b + self.a2a_b
        if kind == BI:
            return self.b - self.w + self.a2a_b
        if kind == W:
            return self.w
        if kind == FB:
            return self.fb if self.fb is not None else self.duration(F) + self.duration(B)
        raise ScheduleError(f"no cost for action kind {kind!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fb"] = self.duration(FB)
        if self.stage_scale is None:
            del d["stage_scale"]
        else:
            d["stage_scale"] = list(self.stage_scale)
        return d


@dataclass(frozen=True)
class Span:
    """One compute action on the timeline."""

    rank: int
    start: float
    end: float
    action: object  # schedule.Action


@dataclass(frozen=True)
class RankStats:
    rank: int
    busy: float
    bubble: float
    peak_activations: int


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    makespan: float
    ranks: list[RankStats]
    spans: list[Span] = field(repr=False)

    @property
    def worst_bubble(self) -> float:
        return max(r.bubble for r in self.ranks)

    @property
    def peak_activations(self) -> int:
        return max(r.peak_activations for r in self.ranks)

    def chrome_trace(self) -> dict:
        """The timeline in Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev); 1 cost unit = 1 ms."""
        from .trace import chrome_trace

        return chrome_trace(self)


def simulate(schedule: Schedule, costs: Costs | None = None, check: bool = True) -> SimResult:
    """Run `schedule` with `costs`; see the module docstring for the model and what bubble means."""
    costs = costs or Costs()
    if check:
        from .validate import validate

        validate(schedule)
    pp = schedule.pp
    clock = [0.0] * pp
    pc = [0] * pp
    busy = [0.0] * pp
    live = [0] * pp
    peak = [0] * pp
    arrival: dict[tuple, float] = {}
    model = P2PModel(pp, comm=costs.comm)
    spans: list[Span] = []
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            acts = schedule.ranks[r]
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if a.kind == SEND:
                    arrival[(r, a.peer, a.what, a.stage, a.mb)] = clock[r] + costs.comm
                elif a.kind == RECV:
                    key = (a.peer, r, a.what, a.stage, a.mb)
                    if key not in arrival:
                        break
                    clock[r] = max(clock[r], arrival[key])
                elif a.kind == POST:
                    model.post(r, a.ops, clock[r])
                elif a.kind == WAIT:
                    done = [model.done_time(r, op) for op in a.ops]
                    if any(t is None for t in done):
                        break
                    clock[r] = max([clock[r], *done])
                else:
                    d = costs.action_time(a)
                    start = clock[r]
                    clock[r] += d
                    busy[r] += d
                    if a.kind in (F, FB):
                        live[r] += 1
                        peak[r] = max(peak[r], live[r])
                    if a.kind in (B, W, FB) or schedule.forward_only:  # inference keeps nothing for later
                        live[r] -= 1
                    spans.append(Span(r, start, clock[r], a))
                pc[r] += 1
                progress = True
    if any(pc[r] < len(schedule.ranks[r]) for r in range(pp)):
        raise ScheduleError("simulation stalled: the schedule deadlocks (run validate() for details)")
    makespan = max(clock) if pp else 0.0
    stats = [RankStats(r, busy[r], makespan - busy[r], peak[r]) for r in range(pp)]
    return SimResult(schedule, costs, makespan, stats, spans)


def bubble_formula(kind: str, pp: int, costs: Costs) -> float | None:
    """The DualPipe README's bubble for `kind` with `pp` pipeline ranks (None where the table has no row).

    The README compares methods at the same number of stages PP. DualPipe with pp ranks has PP = pp stages;
    DualPipeV with pp ranks has PP = 2*pp stages, so its (PP/2-1) is (pp-1). W is the weight-gradient part of
    B and F&B the overlapped pair's cost (costs.fb).
    """
    f, b, w = costs.duration(F), costs.duration(B), costs.w
    fb = costs.duration(FB)
    if kind == "1f1b":
        return (pp - 1) * (f + b)
    if kind == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if kind == "dualpipe":
        return (pp / 2 - 1) * (fb + b - 3 * w)
    if kind == "dualpipev":
        return (pp - 1) * (fb + b - 3 * w)
    return None
