"""Simulator: parity with an independent critical-path computation; README bubble formulas; activations."""

from __future__ import annotations

import json
import random
from functools import cache

import pytest

from parallel.pipeline import ScheduleError, build
from parallel.pipeline.schedule import BI, FB, B, F, W
from parallel.pipeline.simulate import Costs, bubble_formula, simulate

# Cost sets with the usual transformer shape W <= F <= B - W (backward ~ 2x forward, W ~ I); the README
# formulas for ZB1P and DualPipe presuppose it (see docs/pipeline.md, "bubble").
COSTS = [
    Costs(f=1, b=2, w=1, fb=3),  # F&B with no overlap gain
    Costs(f=1, b=2, w=1, fb=2),  # perfect overlap: F&B costs max(F, B)
    Costs(f=1, b=2, w=0.5, fb=2.4),
    Costs(f=1.5, b=4, w=1, fb=4.5),
    Costs(f=1, b=3, w=1, fb=3.2),
    Costs(f=2, b=5, w=1.5, fb=6),
]


@cache
def _built(kind: str, pp: int, chunks: int):
    return build(kind, pp, chunks)  # validated once here; the loops below simulate with check=False


def _sim(kind: str, pp: int, chunks: int, costs: Costs):
    return simulate(_built(kind, pp, chunks), costs, check=False)


def _reference_times(s, costs):
    """Earliest start of every compute action as a longest path in the dependency DAG (no event loop):
    an action starts when the previous action of its rank has ended and its inputs have arrived."""
    order, producer = {}, {}
    for r in range(s.pp):
        comp = s.compute_actions(r)
        for i, a in enumerate(comp):
            order[(r, i)] = a
            for k, st, m, _c in a.computes():
                producer[(k, st, m)] = (r, i)

    @cache
    def end(r: int, i: int) -> float:
        return start(r, i) + costs.action_time(order[(r, i)])

    @cache
    def start(r: int, i: int) -> float:
        t = end(r, i - 1) if i > 0 else 0.0
        for k, st, m, _c in order[(r, i)].computes():
            deps = []
            if k == F and st > 0:
                deps.append((F, st - 1, m))
            if k in (B, BI) and st < s.num_stages - 1:
                deps.append((B if (B, st + 1, m) in producer else BI, st + 1, m))
            for d in deps:
                pr, pi = producer[d]
                t = max(t, end(pr, pi) + (costs.comm if pr != r else 0.0))
        return t

    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    return {key: (start(*key), end(*key)) for key in order}


@pytest.mark.parametrize("kind,pp,chunks", [("gpipe", 4, 6), ("1f1b", 4, 9), ("zb1p", 8, 16),
                                            ("dualpipe", 4, 10), ("dualpipe", 8, 16), ("dualpipev", 3, 7),
                                            ("dualpipev", 4, 12)])
def test_simulator_matches_critical_path_reference(kind, pp, chunks):
    rng = random.Random(f"{kind}-{pp}-{chunks}")
    s = build(kind, pp, chunks)
    for _ in range(4):
        f, b = rng.uniform(0.5, 2), rng.uniform(0.5, 4)
        costs = Costs(f=f, b=b, w=rng.uniform(0, b), fb=rng.uniform(max(f, b), f + b), comm=rng.uniform(0, 1))
        res = simulate(s, costs)
        ref = _reference_times(s, costs)
        got = {}
        for r in range(pp):
            spans = [x for x in res.spans if x.rank == r]
            for i, sp in enumerate(spans):
                got[(r, i)] = (sp.start, sp.end)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=1e-9)
        assert res.makespan == pytest.approx(max(e for _s, e in ref.values()))
        for st in res.ranks:
            assert st.busy == pytest.approx(sum(e - b_ for (r, _i), (b_, e) in ref.items() if r == st.rank))
            assert st.bubble == pytest.approx(res.makespan - st.busy)


@pytest.mark.parametrize("pp", [2, 4, 7])
def test_gpipe_closed_form_with_latency(pp):
    m, c = 5, Costs(f=1.25, b=2.5, w=1, comm=0.375)
    res = simulate(build("gpipe", pp, m), c)
    assert res.makespan == pytest.approx((m + pp - 1) * (c.f + c.b) + 2 * (pp - 1) * c.comm)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", COSTS)
def test_1f1b_bubble_equals_formula(pp, costs):
    for chunks in (pp, 2 * pp + 1, 4 * pp):
        res = _sim("1f1b", pp, chunks, costs)
        assert res.worst_bubble == pytest.approx(bubble_formula("1f1b", pp, costs), abs=1e-9)
        assert res.worst_bubble == pytest.approx((pp - 1) * (costs.f + costs.b), abs=1e-9)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", COSTS)
def test_zb1p_bubble_within_formula(pp, costs):
    for chunks in (pp, 2 * pp + 1, 4 * pp):
        zb = _sim("zb1p", pp, chunks, costs)
        assert zb.worst_bubble <= bubble_formula("zb1p", pp, costs) + 1e-9
        # with W <= F <= B - W our ZB-H1 meets the formula exactly, not just under it
        assert zb.worst_bubble == pytest.approx(bubble_formula("zb1p", pp, costs), abs=1e-9)
        one = _sim("1f1b", pp, chunks, costs)
        assert zb.worst_bubble < one.worst_bubble  # deferring W pays whenever w > 0


@pytest.mark.parametrize("stages", [4, 8, 16])
@pytest.mark.parametrize("costs", COSTS)
def test_dualpipe_bubbles_within_formula(stages, costs):
    """DualPipe with PP ranks and DualPipeV with PP/2 ranks (both PP stages) against (PP/2-1)(F&B+B-3W)."""
    for kind, ranks in (("dualpipe", stages), ("dualpipev", stages // 2)):
        for chunks in (2 * ranks, 2 * ranks + 2, 4 * ranks):
            res = _sim(kind, ranks, chunks, costs)
            formula = bubble_formula(kind, ranks, costs)
            assert formula == pytest.approx((stages / 2 - 1) * (costs.duration(FB) + costs.b - 3 * costs.w))
            assert res.worst_bubble <= formula + 1e-9


def test_formulas_hold_for_random_costs_of_transformer_shape():
    """Random costs with W <= F <= B - W and max(F, B) <= F&B <= F + B, random sizes (docs/pipeline.md)."""
    rng = random.Random(7)
    for _ in range(30):
        f = rng.uniform(0.5, 3)
        w = f * rng.uniform(0, 1)
        b = w + f * rng.uniform(1, 3)
        c = Costs(f=f, b=b, w=w, fb=rng.uniform(max(f, b), f + b))
        for kind in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
            ranks = rng.choice([2, 4]) if kind == "dualpipev" else rng.choice([4, 8])
            chunks = 2 * ranks + 2 * rng.randrange(4)
            res = _sim(kind, ranks, chunks, c)
            assert res.worst_bubble <= bubble_formula(kind, ranks, c) + 1e-9, (kind, ranks, chunks, c)


def test_dualpipe_beats_1f1b_at_same_stages():
    c = Costs(f=1, b=2, w=1, fb=2.2)
    assert simulate(build("dualpipe", 8, 32), c).worst_bubble < simulate(build("1f1b", 8, 32), c).worst_bubble


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_peak_activations_match_readme(pp):
    chunks = 4 * pp
    one = simulate(build("1f1b", pp, chunks))
    assert [r.peak_activations for r in one.ranks] == [pp - r for r in range(pp)]
    assert max(r.peak_activations for r in simulate(build("zb1p", pp, chunks)).ranks) == pp
    assert simulate(build("dualpipe", pp, chunks)).peak_activations == pp + 1
    assert simulate(build("dualpipev", pp, chunks)).peak_activations == 2 * pp + 1  # PP + 1 at 2pp stages
    assert simulate(build("gpipe", pp, chunks)).peak_activations == chunks


def test_forward_only_simulation():
    from parallel.pipeline import forward_only

    pp, m, c = 4, 6, Costs(f=1.5, b=2, w=1, comm=0.25)
    res = simulate(forward_only(build("1f1b", pp, m)), c)
    assert res.makespan == pytest.approx((m + pp - 1) * c.f + (pp - 1) * c.comm)  # a plain forward pipeline
    assert res.peak_activations == 1
    assert all(r.busy == pytest.approx(m * c.f) for r in res.ranks)


def test_latency_never_shortens_a_step():
    for kind, pp, m in (("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)):
        s = build(kind, pp, m)
        times = [simulate(s, Costs(f=1, b=2, w=1, fb=2.5, comm=c)).makespan for c in (0, 0.1, 0.5, 2)]
        assert times == sorted(times) and times[-1] > times[0]


def test_exposed_all_to_all_is_hidden_only_inside_fb():
    s = build("dualpipev", 2, 8)
    base = simulate(s, Costs(f=1, b=2, w=1, fb=3))
    a2a = simulate(s, Costs(f=1, b=2, w=1, fb=3, a2a_f=0.5, a2a_b=0.5))
    n_f = sum(1 for a in s.compute_actions(0) if a.kind == F)
    n_b = sum(1 for a in s.compute_actions(0) if a.kind in (B, BI))
    assert a2a.ranks[0].busy == pytest.approx(base.ranks[0].busy + 0.5 * (n_f + n_b))


def test_stage_scale():
    s = build("dualpipev", 2, 6)
    base = simulate(s, Costs(f=1, b=2, w=1, fb=2.5, comm=0.3))
    double = simulate(s, Costs(f=2, b=4, w=2, fb=5, comm=0.6))
    scaled = simulate(s, Costs(f=1, b=2, w=1, fb=2.5, comm=0.6, stage_scale=(2, 2, 2, 2)))
    assert scaled.makespan == pytest.approx(double.makespan) == pytest.approx(2 * base.makespan)
    # a heavier last stage (rank 0's chunk 1): rank 0 gets busier by exactly the extra time of that stage
    heavy = simulate(s, Costs(f=1, b=2, w=1, fb=2.5, stage_scale=(1, 1, 1, 1.5)))
    plain = simulate(s, Costs(f=1, b=2, w=1, fb=2.5))
    extra = 0.0
    for a in s.compute_actions(0):
        c = Costs(f=1, b=2, w=1, fb=2.5)
        if a.kind == FB:
            extra += c.duration(FB) * (0.5 * ((a.stage == 3) + (a.b_stage == 3)) * 0.5)
        elif a.stage == 3:
            extra += c.duration(a.kind) * 0.5
    assert extra > 0
    assert heavy.ranks[0].busy == pytest.approx(plain.ranks[0].busy + extra)
    assert heavy.ranks[1].busy == pytest.approx(plain.ranks[1].busy)
    with pytest.raises(ScheduleError, match="stage_scale has 2 entries"):
        simulate(s, Costs(stage_scale=(1, 1)))
    with pytest.raises(ScheduleError, match="stage_scale must hold finite numbers > 0"):
        Costs(stage_scale=(1, 0))


def test_costs_validation():
    with pytest.raises(ScheduleError, match="cost f must be a finite number >= 0"):
        Costs(f=-1)
    with pytest.raises(ScheduleError, match="must not exceed b"):
        Costs(b=1, w=2)
    assert Costs(f=1, b=2).duration(FB) == 3  # default: no overlap gain
    assert Costs(f=1, b=2, w=0.5).duration(BI) == 1.5
    assert Costs(f=1, b=2, w=0.5).duration(W) == 0.5


def test_chrome_trace():
    res = simulate(build("dualpipe", 4, 8), Costs(f=1, b=2, w=1, fb=2.5, comm=0.25))
    trace = json.loads(json.dumps(res.chrome_trace()))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(res.spans) == sum(len(res.schedule.compute_actions(r)) for r in range(4))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {f"rank {r}" for r in range(4)}
    for r in range(4):  # a rank's events do not overlap and end at its last action
        evs = sorted((e for e in xs if e["tid"] == r), key=lambda e: e["ts"])
        for a, b in zip(evs, evs[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(res.makespan * 1000)
    fb = next(e for e in xs if e["cat"] == "FB")
    assert {"b_stage", "b_mb"} <= fb["args"].keys()


def test_png_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    from parallel.pipeline.trace import render_png

    path = tmp_path / "t.png"
    render_png(simulate(build("dualpipev", 2, 4)), str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_send_latency_applies_only_across_ranks():
    # dualpipev's turn (stages pp-1 -> pp) stays on one rank: no p2p there, so no latency either
    s = build("dualpipev", 1, 2)
    assert all(a.kind not in ("SEND", "RECV") for a in s.ranks[0])
    assert simulate(s, Costs(comm=5)).makespan == simulate(s, Costs(comm=0)).makespan
