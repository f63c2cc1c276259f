"""Lock-step lowering, NCCL's p2p semantics model, and the validator / simulator on lowered programs
(pure Python: no processes, no torch). The emulation on real ranks is tests/test_p2p_emulation.py."""

from __future__ import annotations

import dataclasses

import pytest
from test_schedule import _edit, _index, _rejects  # the broken-schedule helpers

from parallel.pipeline import ScheduleError, build, forward_only, simulate, validate
from parallel.pipeline.lower import lower, message_order
from parallel.pipeline.p2p_model import P2PModel
from parallel.pipeline.schedule import COMPUTE_KINDS, POST, RECV, SEND, WAIT, Action
from parallel.pipeline.simulate import Costs

KINDS = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


def _chunk_counts(kind: str, pp: int) -> list[int]:
    if kind == "dualpipe":
        return [2 * pp, 2 * pp + 2, 6 * pp]
    if kind == "dualpipev":
        return [2 * pp, 2 * pp + 1, 5 * pp]
    return [1, pp - 1 or 1, pp + 3, 4 * pp + 1]


CASES = [(k, pp, m) for k in KINDS for pp in (2, 4, 8) for m in _chunk_counts(k, pp)]
CASES += [(k, 1, m) for k in ("gpipe", "1f1b", "zb1p") for m in (1, 3)] + [("dualpipev", 1, 2), ("dualpipev", 1, 5)]


def _ops(acts, kind=None):
    return [op for a in acts if a.kind == POST for op in a.ops if kind is None or op.kind == kind]


# ----------------------------------------------------------------------------------------- the model

def _send(peer, mb=0):
    return Action(SEND, 0, mb, peer=peer, what="act")


def _recv(peer, mb=0):
    return Action(RECV, 0, mb, peer=peer, what="act")


def test_model_rendezvous_send_waits_for_the_receive():
    m = P2PModel(2)
    s = _send(1)
    m.post(0, (s,))
    assert m.done_time(0, s) is None  # no eager buffering: nothing completes before the receive runs
    r = _recv(0)
    m.post(1, (r,))
    assert m.done_time(0, s) == 0 and m.done_time(1, r) == 0


def test_model_fifo_per_pair_and_groups():
    """Cross sends posted alone deadlock (each head is a send whose receive is queued behind the other's
    send); the same ops as one group per rank progress together."""
    for grouped in (False, True):
        m = P2PModel(2)
        a0, a1 = Action(SEND, 0, 0, peer=1, what="act"), Action(RECV, 1, 0, peer=1, what="grad")
        b0, b1 = Action(SEND, 1, 0, peer=0, what="grad"), Action(RECV, 0, 0, peer=0, what="act")
        for rank, ops in ((0, (a0, a1)), (1, (b0, b1))):
            if grouped:
                m.post(rank, ops)
            else:
                for op in ops:
                    m.post(rank, (op,))
        finished = [m.done_time(0, a1), m.done_time(1, b1)]
        assert finished == ([0, 0] if grouped else [None, None])
        if not grouped:
            why = " ".join(m.explain(0))
            assert "SEND act s0 mb0 -> r1 waits for rank 1's POST #1 [RECV act s0 mb0 <- r0] to start" in why


def test_model_queues_per_pair_or_per_rank():
    """Rank 0's receive from rank 2 does not wait behind its unmatched send to rank 1 when queues are per
    rank pair, and does with one queue per rank."""
    for per_rank in (False, True):
        m = P2PModel(3, per_rank=per_rank)
        m.post(0, (_send(1),))
        r = _recv(2)
        m.post(0, (r,))
        m.post(2, (_send(0),))
        assert (m.done_time(0, r) is None) == per_rank


def test_model_times_and_multi_peer_groups():
    """comm after the later start; a group with two peers starts when it is first in both queues."""
    m = P2PModel(3, comm=1.0)
    first = _send(2, mb=9)
    m.post(0, (first,), t=0.0)
    g = (_send(1), _send(2))
    m.post(0, g, t=1.0)
    m.post(1, (_recv(0),), t=0.5)
    assert m.done_time(0, g[0]) is None  # first in line with rank 1, but behind `first` with rank 2
    m.post(2, (_recv(0, mb=9),), t=4.0)
    assert m.done_time(0, first) == 5.0
    m.post(2, (_recv(0),), t=0.0)  # rank 2's queue: behind its first receive, which finished at 5
    assert m.done_time(0, g[0]) == m.done_time(0, g[1]) == 6.0  # g starts at 5 (after `first`), + comm
    assert not m.mismatches


def test_model_reports_messages_matched_by_position():
    m = P2PModel(2)
    m.post(0, (_send(1, mb=0),))
    m.post(1, (_recv(0, mb=1),))
    assert m.mismatches and "matched in posting order" in m.mismatches[0]


# ----------------------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("kind,pp,chunks", CASES)
def test_lockstep_programs_cannot_deadlock_under_nccl(kind, pp, chunks):
    s = build(kind, pp, chunks)
    for prog in (lower(s), lower(forward_only(s))):  # lower() validates, per rank pair
        validate(prog, per_rank_queue=True)  # and the stricter reading: one queue per rank
        assert prog.lowered == "lockstep"
    low = lower(s)
    order = {m: i for i, m in enumerate(message_order(s))}
    for r in range(pp):
        # compute unchanged, in the same order
        assert [a for a in low.ranks[r] if a.kind in COMPUTE_KINDS] == s.compute_actions(r)
        # every SEND / RECV posted exactly once; the rank's ops follow the one global order
        posted = _ops(low.ranks[r])
        assert sorted(map(str, posted)) == sorted(str(a) for a in s.ranks[r] if a.kind in (SEND, RECV))
        idx = [order[(r, o.peer, o.what, o.stage, o.mb) if o.kind == SEND else (o.peer, r, o.what, o.stage, o.mb)]
               for o in posted]
        assert idx == sorted(idx), (kind, pp, chunks, r)
        for i, a in enumerate(low.ranks[r]):
            if a.kind == POST:  # a group: sends, then at most one receive, and only as its last op
                kinds = [o.kind for o in a.ops]
                assert RECV not in kinds[:-1], a
            if a.kind == WAIT and any(o.kind == RECV for o in a.ops):  # waited right before its consumer
                nxt = low.ranks[r][i + 1]
                assert nxt.kind in COMPUTE_KINDS, (a, nxt)
        recv_pos = {o: i for i, a in enumerate(low.ranks[r]) if a.kind == POST for o in a.ops}
        old_pos = {a: i for i, a in enumerate(s.ranks[r]) if a.kind == RECV}
        n_compute_before = lambda acts, i: sum(x.kind in COMPUTE_KINDS for x in acts[:i])  # noqa: E731
        for op, i in old_pos.items():  # receives are posted no later than the builder's RECV
            assert n_compute_before(low.ranks[r], recv_pos[op]) <= n_compute_before(s.ranks[r], i)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_per_op_posting_deadlocks_every_schedule_but_gpipe(kind, pp):
    """The executor's posting before lowering: each RECV alone and waited at once, each SEND alone."""
    chunks = 2 * pp + (kind != "dualpipe")  # (1F1B with a single micro-batch is GPipe, and survives)
    old = lower(build(kind, pp, chunks), "per-op")
    assert old.lowered == "per-op"
    if kind == "gpipe":
        validate(old)
        return
    with pytest.raises(ScheduleError, match="deadlock under NCCL p2p semantics"):
        validate(old)


def test_per_op_1f1b_deadlock_message():
    with pytest.raises(ScheduleError) as info:
        validate(lower(build("1f1b", 2, 4), "per-op"))
    msg = str(info.value)
    assert "rank 0 waits at action 5 (WAIT[RECV grad s1 mb0 <- r1]), rank 1 waits at action 6 " \
           "(WAIT[RECV act s0 mb1 <- r0])" in msg
    assert "rank 0's POST #2 [RECV grad s1 mb0 <- r1] is queued behind rank 0's POST #1 " \
           "[SEND act s0 mb1 -> r1]" in msg


def test_lower_rejects_bad_input():
    s = build("1f1b", 2, 4)
    with pytest.raises(ScheduleError, match="unknown lowering 'eager'; valid: lockstep, per-op"):
        lower(s, "eager")
    with pytest.raises(ScheduleError, match="already lowered"):
        lower(lower(s))
    with pytest.raises(ScheduleError, match="lower\\(forward_only\\(s\\)\\)"):
        forward_only(lower(s))
    broken = dataclasses.replace(s, ranks=(s.ranks[0], tuple(a for a in s.ranks[1] if a.kind != SEND)))
    with pytest.raises(ScheduleError, match="cannot lower 1f1b: its abstract program deadlocks"):
        lower(broken)


# ------------------------------------------------------------------------ validator on lowered programs

def test_validator_rejects_wait_after_its_consumer():
    low = lower(build("1f1b", 2, 4))

    def late(acts):
        i = _index(acts, lambda a: a.kind == WAIT and a.ops[0].kind == RECV)
        acts.insert(i + 2, acts.pop(i))

    _rejects(_edit(low, 1, late), r"rank 1: F0@s1 runs before the activation of stage 0 mb 0 is on this rank")


def test_validator_rejects_send_posted_before_its_compute():
    low = lower(build("1f1b", 2, 4))
    _rejects(_edit(low, 0, lambda acts: acts.insert(0, acts.pop(1))),
             r"rank 0: POST\[SEND act s0 mb0 -> r1\] runs before act of stage 0 mb 0 is computed on this rank")


def test_validator_rejects_ops_never_waited_or_waited_twice():
    low = lower(build("1f1b", 2, 4))
    _rejects(_edit(low, 0, lambda acts: acts.pop()), r"rank 0: posts SEND act s0 mb0 -> r1 but never waits "
                                                      r"for it \(and 3 more\)")
    _rejects(_edit(low, 0, lambda acts: acts.append(acts[-1])), r"waited for already")


def test_validator_rejects_posting_order_that_mismatches():
    low = lower(build("1f1b", 2, 4))

    def swap(acts):  # rank 1 posts its receives of act mb0 and mb1 in the other order
        i, j = [i for i, a in enumerate(acts) if a.kind == POST][:2]
        acts[i], acts[j] = acts[j], acts[i]

    _rejects(_edit(low, 1, swap), r"p2p order rank 0->1: message 0 is sent as act of stage 0 mb 0 but received "
                                  r"as act of stage 0 mb 1")


def test_validator_rejects_mixed_programs():
    s = build("1f1b", 2, 4)
    low = lower(s)
    _rejects(_edit(low, 0, lambda acts: acts.append(s.ranks[0][1])), r"SEND act s0 mb0 -> r1 in a lowered schedule")
    _rejects(_edit(s, 0, lambda acts: acts.append(low.ranks[0][1])), r"in a builder's schedule")
    _rejects(_edit(low, 0, lambda acts: acts.append(Action(POST, -1, -1))), r"must carry SEND / RECV ops")


def test_validator_finds_a_group_split_that_deadlocks():
    """DualPipeV's lock-step program, with one rank's send-and-receive group split so that the receive is
    posted first: the receive then waits in its queue ahead of the send the peer needs first."""
    low = lower(build("dualpipev", 2, 4))

    def split(acts):
        i = _index(acts, lambda a: a.kind == POST and len(a.ops) == 2 and a.ops[0].kind == SEND
                   and a.ops[1].peer == a.ops[0].peer)
        g = acts.pop(i)
        acts[i:i] = [Action(POST, -1, -1, ops=(g.ops[1],)), Action(POST, -1, -1, ops=(g.ops[0],))]

    _rejects(_edit(low, 1, split), r"deadlock under NCCL p2p semantics")


# ------------------------------------------------------------------------------- simulator on lowered

@pytest.mark.parametrize("kind", KINDS)
def test_simulated_lockstep_program_costs_what_the_schedule_costs(kind):
    """With the reference run's costs and no p2p time, the lowered program is exactly as fast as the
    builder's schedule: posting in lock-step never makes compute wait. With comm > 0 each rank pair moves
    one message at a time (one NCCL stream), which may only add time."""
    for pp in (2, 4, 8):
        for chunks in _chunk_counts(kind, pp)[:2]:
            s = build(kind, pp, chunks)
            low = lower(s)
            assert simulate(low, Costs()).makespan == simulate(s, Costs()).makespan
            for c in (Costs(comm=0.3), Costs(f=1, b=2, w=1, fb=2.5, comm=1)):
                assert simulate(low, c).makespan >= simulate(s, c).makespan - 1e-9
            spans = simulate(low, Costs()).spans
            assert len(spans) == sum(len(s.compute_actions(r)) for r in range(pp))


def test_simulator_stalls_on_a_deadlocking_program():
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(lower(build("1f1b", 2, 4), "per-op"), check=False)
