"""Step time of a pipeline schedule from the shared simulator (parallel/pipeline), fast enough for a search.

`moerun plan` and `moerun schedule` share one model: this module builds the schedule with
`parallel.pipeline.build` and runs `parallel.pipeline.simulate.simulate` on per-action costs from the cost
model. Two things keep hundreds of layouts under a few seconds:

- Scale invariance: the simulator is linear in its costs, so results are cached per (kind, pp, chunks,
  costs / f rounded to 3 significant digits) and rescaled by f.
- Steady-state extrapolation: for many micro-batches, the schedule is simulated at two small valid chunk
  counts M1 < M2 (M1 = the schedule's minimum, at least 2*pp, made even; M2 = M1 + 4); makespan and the worst
  rank's bubble are extended linearly to M (every added pair of micro-batches adds the same steady-state
  work in 1F1B, ZB1P, DualPipe and DualPipeV). The test suite checks this against a full simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SIM_KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class PipeResult:
    makespan: float            # seconds for all micro-batches of one step (no DP / optimizer)
    bubble: float              # the worst rank's idle seconds within the makespan
    peak_activations: int      # most (stage, micro-batch) activation sets a rank holds
    simulated_chunks: tuple[int, ...]  # chunk counts actually simulated


class PipelineError(ValueError):
    pass


def min_chunks(kind: str, pp: int) -> int:
    """The fewest micro-batches the schedule accepts (and the parity it needs)."""
    if kind == "dualpipe":
        return 2 * pp
    if kind == "dualpipev":
        return 2 * pp
    return 1


def valid_chunks(kind: str, pp: int, chunks: int) -> bool:
    if chunks < min_chunks(kind, pp):
        return False
    if kind == "dualpipe":
        return pp % 2 == 0 and chunks % 2 == 0
    return True


def _round3(x: float) -> float:
    return float(f"{x:.3g}")


@lru_cache(maxsize=512)
def _schedule(kind: str, pp: int, chunks: int):
    from parallel.pipeline import build

    return build(kind, pp, chunks, check=False)  # the builders are validated by their own tests


@lru_cache(maxsize=4096)
def _simulate_norm(kind: str, pp: int, chunks: int, b: float, w: float, fb: float | None, comm: float,
                   a2a_f: float, a2a_b: float) -> tuple[float, float, int]:
    from parallel.pipeline.simulate import Costs, simulate

    sched = _schedule(kind, pp, chunks)
    res = simulate(sched, Costs(f=1.0, b=b, w=w, fb=fb, comm=comm, a2a_f=a2a_f, a2a_b=a2a_b), check=False)
    return res.makespan, res.worst_bubble, res.peak_activations


def pipeline_time(kind: str, pp: int, chunks: int, f: float, b: float, w: float, fb: float | None,
                  comm: float, a2a_f: float = 0.0, a2a_b: float = 0.0, exact: bool = False) -> PipeResult:
    """Makespan, worst bubble and peak activations of `chunks` micro-batches; see the module docstring."""
    if kind not in SIM_KINDS:
        raise PipelineError(f"unknown schedule {kind!r}; valid: {', '.join(SIM_KINDS)}")
    if not valid_chunks(kind, pp, chunks):
        raise PipelineError(f"{kind} with pp={pp} cannot run {chunks} micro-batches")
    if f <= 0:
        raise PipelineError(f"forward cost must be > 0, got {f}")
    key = (_round3(b / f), _round3(min(w, b) / f), None if fb is None else _round3(fb / f), _round3(comm / f),
           _round3(a2a_f / f), _round3(a2a_b / f))
    m1 = max(min_chunks(kind, pp), 2 * pp)  # past every schedule's warm-up: the steady state
    m1 += m1 % 2
    m2 = m1 + 4
    if exact or chunks <= m2:
        mk, bub, peak = _simulate_norm(kind, pp, chunks, *key)
        return PipeResult(mk * f, bub * f, peak, (chunks,))
    mk1, bub1, peak1 = _simulate_norm(kind, pp, m1, *key)
    mk2, bub2, peak2 = _simulate_norm(kind, pp, m2, *key)
    t = (chunks - m1) / (m2 - m1)
    mk = mk1 + t * (mk2 - mk1)
    bub = max(0.0, bub1 + t * (bub2 - bub1))
    return PipeResult(mk * f, bub * f, max(peak1, peak2), (m1, m2))
