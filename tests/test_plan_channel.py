"""Multi-rank serving's PlanChannel holds every broadcast message to MAX_PLAN_BYTES at both ends."""

from __future__ import annotations

import pytest
from dist_spawn import run_spawn

from runtime.serve.distributed import MAX_PLAN_BYTES, PlanChannel


def test_send_refuses_an_oversize_message_before_broadcasting():
    # group=None: had send reached a broadcast it would fail on the missing process group instead
    with pytest.raises(ValueError, match=rf"of \d+ bytes exceeds the limit of {MAX_PLAN_BYTES} bytes"):
        PlanChannel(None).send({"t": b"\0" * MAX_PLAN_BYTES})


def _bad_lengths(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    ch = PlanChannel(dist.group.WORLD)
    plan = {"t": "plan", "plan": {"ids": [1, 2, 3]}}
    for bad in (MAX_PLAN_BYTES + 1, -1, 2**62):
        if rank == 0:
            ch.send(plan)
            dist.broadcast(torch.tensor([bad], dtype=torch.int64), 0)  # a corrupt length, no payload
        else:
            assert ch.recv() == plan
            with pytest.raises(ValueError, match=rf"length {bad} bytes is outside \[0, {MAX_PLAN_BYTES}\]"):
                ch.recv()
    if rank == 0:  # the refused lengths left both ranks in step: the channel still works
        ch.send({"t": "stop"})
    else:
        assert ch.recv() == {"t": "stop"}


@pytest.mark.timeout(120)
def test_recv_refuses_a_length_outside_the_bound():
    run_spawn(_bad_lengths, 2)
