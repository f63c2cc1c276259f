"""Pipeline stages of a layout for the planner: unit cost rows, layers per stage, the stages each rank holds.

A unit (embedding, decoder layer, head, MTP module) is a row of FIELDS; a stage's row is the sum of its
units' (the largest transient). Layers are split by water-filling the ranks' loads (`partition`) or, for
the "moerun" recipe, as moerun's runtime splits them (parallel.pipeline.layer_split).
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from .costmodel import UnitCost

# Columns of a unit / stage cost row.
FIELDS = ("f", "b", "w", "a2a_f", "a2a_b", "tp_f", "tp_b", "params_dense", "params_expert", "act_bytes",
          "transient_bytes")
F_, B_, W_, AF, AB, TF, TB, PD, PE, ACT, TR = range(len(FIELDS))
TIME = slice(0, 7)


@lru_cache(maxsize=64)
def rank_stages(kind: str, pp: int) -> list[list[int]]:
    """Stages held by each pipeline rank: the schedule builders' own placement."""
    from parallel.pipeline.schedule import build

    sched = build(kind, pp, 2 * pp, check=False)  # the placement does not depend on the micro-batch count
    return [list(sched.stages_of(r).values()) for r in range(pp)]


def visit_weight(row, overlap: bool) -> float:
    """What the stage balancer equalises: a micro-batch's time on the rank. With F&B overlap the all-to-all
    hides behind compute (counted only where it exceeds it); without, it adds up."""
    comp = row[F_] + row[B_]
    comm = row[AF] + row[AB]
    return float((max(comp, comm) if overlap else comp + comm) + row[TF] + row[TB])


def unit_matrix(units: list[UnitCost]) -> np.ndarray:
    return np.array([[getattr(u, f) for f in FIELDS] for u in units], dtype=float)


def partition(extra_first: float, extra_last: float, layer_w: float, n_layers: int, kind: str, pp: int) -> list[int]:
    """Layers per stage: embedding fixed on the first stage, head and MTP on the last; each layer goes,
    in turn, to a stage of the least-loaded rank (water-filling, optimal for identical layers)."""
    lw = layer_w if layer_w > 0 else 1.0
    return list(_partition(round(extra_first / lw, 3), round(extra_last / lw, 3), n_layers, kind, pp))


@lru_cache(maxsize=8192)
def _partition(extra_first: float, extra_last: float, n_layers: int, kind: str, pp: int) -> tuple[int, ...]:
    n_stages = 2 * pp if kind == "dualpipev" else pp
    # ranks holding the same stages (DualPipe's mirrored pairs) form one group with one load
    groups = sorted({tuple(sorted(ss)) for ss in rank_stages(kind, pp)})
    extra = [0.0] * n_stages
    extra[0] += extra_first
    extra[-1] += extra_last
    counts = [0] * n_stages
    heap = [(sum(extra[st] for st in g), i) for i, g in enumerate(groups)]
    heapq.heapify(heap)
    for _ in range(n_layers):
        load, i = heapq.heappop(heap)
        st = min(groups[i], key=lambda x: (counts[x], x))
        counts[st] += 1
        heapq.heappush(heap, (load + 1.0, i))
    return tuple(counts)


def stage_matrix(U: np.ndarray, counts: list[int]) -> np.ndarray:
    """Stage rows from unit rows: stage 0 adds the embedding (row 0), the last stage the tail (head, MTP)."""
    bounds = [0, 1 + counts[0]]
    for c in counts[1:]:
        bounds.append(bounds[-1] + c)
    bounds[-1] = len(U)
    C = np.vstack([np.zeros(U.shape[1]), np.cumsum(U, axis=0)])
    lo, hi = np.array(bounds[:-1]), np.array(bounds[1:])
    S = C[hi] - C[lo]
    S[:, TR] = [U[a:b, TR].max(initial=0.0) for a, b in zip(lo, hi, strict=True)]
    return S
