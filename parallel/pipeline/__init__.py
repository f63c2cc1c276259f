"""Pipeline parallelism: schedules as data, their validator and simulator (pure Python, no torch).

    from parallel.pipeline import Costs, build, simulate
    res = simulate(build("dualpipev", pp=4, chunks=10), Costs(f=1, b=2, w=1, fb=2.5, comm=0.1))

See schedule.py (data model), simulate.py (cost model, bubble) and docs/pipeline.md.
"""

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
    one_f_one_b,
    phase_steps,
    zb1p,
)
from .simulate import Costs, RankStats, SimResult, Span, bubble_formula, simulate
from .validate import validate

__all__ = [
    "BUILDERS", "SCHEDULE_KINDS", "Action", "Costs", "RankStats", "Schedule", "ScheduleError", "SimResult",
    "Span", "bubble_formula", "build", "dualpipe", "dualpipev", "forward_only", "gpipe", "one_f_one_b", "phase_steps",
    "simulate", "validate", "zb1p",
]
