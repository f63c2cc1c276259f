"""A serving step's plan crosses the control group in one encoding, bounded at both ends by MAX_PLAN_INTS."""

from __future__ import annotations

import pytest
from dist_spawn import run_spawn

from runtime.serve.step import MAX_PLAN_INTS, StepPlan


def test_broadcast_refuses_an_oversize_plan_before_sending(monkeypatch):
    import runtime.serve.step as step

    monkeypatch.setattr(step, "MAX_PLAN_INTS", 20)
    plan = StepPlan()
    plan.add(list(range(12)), 0, [0, 1], 8, True)
    sent = []
    with pytest.raises(ValueError, match=r"step plan of \d+ integers exceeds MAX_PLAN_INTS = 20"):
        plan.broadcast(sent.append)
    assert sent == []  # nothing went out: the ranks stay in step


def _bad_lengths(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    def bcast(t):
        dist.broadcast(t, 0)
        return t

    plan = StepPlan()
    plan.add([5, 6, 7], 0, [3, 9], 2, True)
    for bad in (MAX_PLAN_INTS + 1, 1, -1, 2**62):
        if rank == 0:
            plan.broadcast(bcast)
            bcast(torch.tensor([bad], dtype=torch.int64))  # a corrupt length, no payload
        else:
            assert StepPlan.receive(bcast) == plan
            with pytest.raises(ValueError, match=rf"length {bad} is outside \[2, {MAX_PLAN_INTS}\]"):
                StepPlan.receive(bcast)
    if rank == 0:  # the refused lengths left both ranks in step: nothing-to-run still gets through
        StepPlan.broadcast_none(bcast)
    else:
        assert StepPlan.receive(bcast) is None


@pytest.mark.timeout(120)
def test_receive_refuses_a_length_outside_the_bound():
    run_spawn(_bad_lengths, 2)
