"""Pipeline parallelism: schedules as data, their validator and simulator (pure Python, no torch)."""

from .schedule import (
    BUILDERS,
    SCHEDULE_KINDS,
    Action,
    Schedule,
    ScheduleError,
    build,
    dualpipe,
    dualpipev,
    gpipe,
    one_f_one_b,
    phase_steps,
    zb1p,
)
from .validate import validate

__all__ = [
    "BUILDERS", "SCHEDULE_KINDS", "Action", "Schedule", "ScheduleError", "build", "dualpipe", "dualpipev",
    "gpipe", "one_f_one_b", "phase_steps", "validate", "zb1p",
]
