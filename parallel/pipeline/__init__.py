"""Pipeline parallelism: schedules as data, their lowering to p2p programs, validator and simulator (pure
Python, no torch).

    from parallel.pipeline import Costs, build, lower, simulate
    res = simulate(build("dualpipev", pp=4, chunks=10), Costs(f=1, b=2, w=1, fb=2.5, comm=0.1))
    program = lower(build("1f1b", pp=4, chunks=8))     # the POST / WAIT program the executor posts

See schedule.py (data model), lower.py (p2p under NCCL), simulate.py (cost model, bubble), docs/pipeline.md.
"""

from .lower import lower
from .schedule import (
    BUILDERS,
    SCHEDULE_KINDS,
    Action,
    Schedule,
    ScheduleError,
    build,
    dualpipe,
    dualpipev,
    forward_only,
    gpipe,
    layer_split,
    one_f_one_b,
    phase_steps,
    zb1p,
)
from .simulate import Costs, RankStats, SimResult, Span, bubble_formula, simulate
from .validate import validate

__all__ = [
    "BUILDERS", "SCHEDULE_KINDS", "Action", "Costs", "RankStats", "Schedule", "ScheduleError", "SimResult",
    "Span", "bubble_formula", "build", "dualpipe", "dualpipev", "forward_only", "gpipe", "layer_split", "lower",
    "one_f_one_b", "phase_steps", "simulate", "validate", "zb1p",
]
