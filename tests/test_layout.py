"""Mesh group arithmetic at scale, with no processes."""

import itertools

import pytest

from cluster.layout import DIMS, Layout, LayoutError


def check_partition(layout: Layout) -> None:
    for dim in DIMS:
        groups = layout.groups(dim)
        flat = sorted(itertools.chain.from_iterable(groups))
        assert flat == list(range(layout.world)), f"{dim} groups do not partition the world"
        assert all(len(g) == layout.size(dim) for g in groups), dim
        for g in groups:  # the direct per-rank formula agrees with the enumeration
            for r in g:
                assert layout.group_of(dim, r) == g
                assert layout.coords(r)[dim] == g.index(r)


def test_deepseek_v3_training_layout():
    L = Layout(2048, pp=16, ep=64, tp=1, ranks_per_node=8)
    assert (L.dp, L.edp, L.num_nodes) == (128, 2, 256)
    check_partition(L)
    ep0 = L.groups("ep")[0]
    assert ep0 == list(range(64)) and {L.node_of(r) for r in ep0} == set(range(8))  # EP64 = 8 nodes
    assert L.groups("pp")[0] == [p * 128 for p in range(16)]
    assert L.groups("edp")[0] == [0, 64]
    for g in L.groups("tp"):
        assert len({L.node_of(r) for r in g}) == 1


def test_small_4d_layout():
    L = Layout(16, pp=2, tp=2, ep=4, ranks_per_node=4)
    assert (L.dp, L.edp) == (4, 2)
    check_partition(L)
    assert L.groups("tp")[:2] == [[0, 1], [2, 3]]
    assert L.groups("dp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert L.groups("pp")[0] == [0, 8]
    assert L.groups("ep")[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert L.groups("edp")[:2] == [[0, 4], [1, 5]]
    for g in L.groups("tp"):
        assert len({L.node_of(r) for r in g}) == 1
    # same ep index <=> same experts: edp members share their ep coordinate
    for g in L.groups("edp"):
        assert len({L.coords(r)["ep"] for r in g}) == 1


def test_ep_groups_stay_inside_a_pipeline_stage():
    L = Layout(32, pp=4, tp=2, ep=8)
    for g in L.groups("ep"):
        assert len({L.coords(r)["pp"] for r in g}) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(world=12, pp=5), "does not divide the world size 12"),
    (dict(world=8, tp=2, ep=3), "ep=3 does not divide dp\\*tp"),
    (dict(world=8, dp=3), "is not the world size 8"),
    (dict(world=8, tp=0), "tp must be a positive integer"),
    (dict(world=8, ranks_per_node=3), "ranks per node 3 does not divide"),
])
def test_invalid_layouts_say_what_does_not_divide(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        Layout(**kwargs)


def test_unknown_dimension():
    with pytest.raises(LayoutError, match="valid: tp, pp"):
        Layout(4).groups("cp")
