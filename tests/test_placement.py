"""Expert placement with redundant experts: against contiguous placement and against exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from parallel.planner.placement import contiguous_load, max_over_mean, place, place_layer


def _compositions(total: int, parts: int):
    """Replica counts: `parts` integers >= 1 summing to `total`."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def _partitions(items: list, bins: int, cap: int):
    """All ways to split `items` into `bins` unordered groups of `cap` (first item anchors each group)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for combo in itertools.combinations(range(len(rest)), cap - 1):
        group = [first] + [rest[i] for i in combo]
        left = [rest[i] for i in range(len(rest)) if i not in combo]
        for tail in _partitions(left, bins - 1, cap):
            yield [group, *tail]


def exhaustive_best(load: np.ndarray, gpus: int, redundant: int) -> float:
    """The smallest possible max per-GPU load over every replica count and every slot assignment."""
    E = len(load)
    cap = (E + redundant) // gpus
    best = np.inf
    for counts in _compositions(E + redundant, E):
        weights = [load[e] / counts[e] for e in range(E) for _ in range(counts[e])]
        if max(weights) >= best:
            continue
        for part in _partitions(sorted(weights, reverse=True), gpus, cap):
            best = min(best, max(sum(g) for g in part))
    return best


@pytest.mark.parametrize("experts,gpus,redundant", [(6, 3, 0), (6, 3, 3), (6, 4, 2), (4, 2, 2), (5, 3, 1)])
def test_within_five_percent_of_exhaustive_optimum(experts, gpus, redundant):
    rng = np.random.default_rng(1000 * experts + 10 * gpus + redundant)
    worst = 0.0
    for _ in range(8):
        load = rng.lognormal(0.0, 1.2, size=experts)
        opt = exhaustive_best(load, gpus, redundant)
        got = max(place_layer(load, gpus, redundant).gpu_load)
        assert got >= opt - 1e-9  # the exhaustive search really is a lower bound
        worst = max(worst, got / opt)
    assert worst <= 1.05, f"placement {worst:.3f}x the exhaustive optimum"


def test_heavy_tailed_loads_far_below_contiguous():
    rng = np.random.default_rng(7)
    load = rng.lognormal(0.0, 1.5, size=(6, 256)) * rng.pareto(1.5, size=(6, 256))
    flat = place(load, gpus=32, redundant=32)
    node = place(load, gpus=32, redundant=32, nodes=4, groups=8)
    for lp_flat, lp_node, row in zip(flat, node, load, strict=True):
        before = max_over_mean(contiguous_load(row, 32))
        assert lp_flat.before_max_over_mean == pytest.approx(before)
        assert before > 1.5
        assert lp_flat.after_max_over_mean < 1.1
        assert lp_flat.after_max_over_mean < before / 1.5
        assert lp_node.after_max_over_mean < before  # node-aware trades some balance for locality


def test_placement_is_consistent():
    rng = np.random.default_rng(3)
    load = rng.lognormal(0.0, 1.0, size=64)
    lp = place_layer(load, gpus=16, redundant=16, nodes=2, groups=4)
    slots = [e for s in lp.slots for e in s]
    assert len(lp.slots) == 16 and all(len(s) == 5 for s in lp.slots)
    assert sorted(set(slots)) == list(range(64))  # every expert placed
    assert [slots.count(e) for e in range(64)] == lp.replicas
    assert sum(lp.gpu_load) == pytest.approx(load.sum())
    # node-aware: each node (8 GPUs) holds whole groups of 16 experts and all replicas of them
    for node in range(2):
        experts = {e for s in lp.slots[8 * node:8 * node + 8] for e in s}
        groups = {e // 16 for e in experts}
        assert len(groups) == 2 and experts == {e for g in groups for e in range(16 * g, 16 * g + 16)}


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="do not fill"):
        place_layer(np.ones(10), gpus=4, redundant=0)
    with pytest.raises(ValueError, match=">= 0"):
        place_layer(-np.ones(8), gpus=4)
    with pytest.raises(ValueError, match="shape"):
        place(np.ones((2, 2, 2)), gpus=2)
    with pytest.raises(ValueError, match="divisible by nodes"):
        place_layer(np.ones(8), gpus=4, redundant=0, nodes=2, groups=3)
