"""Pipeline schedule builders and the validator (pure Python: no processes, no torch)."""

from __future__ import annotations

import dataclasses

import pytest

from parallel.pipeline import ScheduleError, build, forward_only, phase_steps, validate
from parallel.pipeline.schedule import BI, FB, RECV, SEND, B, F, W

# Per-rank step counts of DualPipe (the eight step loops of deepseek-ai/DualPipe's dualpipe.py), 8 ranks,
# 20 chunks.
DUALPIPE_8_20 = {
    0: [6, 1, 3, 3, 3, 1, 3, 1],
    1: [4, 2, 2, 4, 2, 2, 2, 2],
    2: [2, 3, 1, 5, 1, 3, 1, 3],
    3: [0, 4, 0, 6, 0, 4, 0, 4],
    4: [0, 4, 0, 6, 0, 4, 0, 4],
}
for _r in (5, 6, 7):
    DUALPIPE_8_20[_r] = DUALPIPE_8_20[7 - _r]

CASES = [(k, pp, m) for k in ("gpipe", "1f1b", "zb1p") for pp in (1, 2, 4, 8) for m in (1, 3, 8, 17)]
CASES += [("dualpipe", pp, m) for pp in (2, 4, 8) for m in (2 * pp, 2 * pp + 2, 6 * pp)]
CASES += [("dualpipev", pp, m) for pp in (1, 2, 4, 8) for m in (2 * pp, 2 * pp + 1, 5 * pp)]


def test_dualpipe_reproduces_reference_phase_steps():
    assert phase_steps(build("dualpipe", 8, 20)) == [DUALPIPE_8_20[r] for r in range(8)]


def test_dualpipev_is_dualpipe_cut_in_half():
    full, half = build("dualpipe", 8, 20), build("dualpipev", 4, 10)
    assert phase_steps(half) == [DUALPIPE_8_20[r] for r in range(4)]
    for r in range(4):  # not only the counts: the same kinds of compute in the same order, rank by rank
        kinds_full = [a.kind for a in full.compute_actions(r)]
        kinds_half = [a.kind for a in half.compute_actions(r)]
        assert kinds_full == kinds_half


@pytest.mark.parametrize("kind,pp,chunks", CASES)
def test_builders_are_valid_and_complete(kind, pp, chunks):
    s = build(kind, pp, chunks)  # validates
    assert len(s.ranks) == pp
    computed = {}
    for r in range(pp):
        for a in s.compute_actions(r):
            for k, st, m, _c in a.computes():
                computed.setdefault((st, m), []).append(k)
                assert s.rank_of(st, m) == r
    assert set(computed) == {(st, m) for st in range(s.num_stages) for m in range(chunks)}
    for kinds in computed.values():
        assert sorted(kinds) in (["B", "F"], ["F", "I", "W"])
    if kind in ("gpipe", "1f1b"):
        assert not any(a.kind in (BI, W) for acts in s.ranks for a in acts)


def test_placement():
    d = build("dualpipe", 4, 8)
    assert [d.stages_of(r) for r in range(4)] == [{0: 0, 1: 3}, {0: 1, 1: 2}, {0: 2, 1: 1}, {0: 3, 1: 0}]
    assert d.rank_of(0, 0) == 0 and d.rank_of(0, 7) == 3  # second half of the micro-batches enter at the end
    v = build("dualpipev", 3, 6)
    assert v.num_stages == 6
    assert [v.stages_of(r) for r in range(3)] == [{0: 0, 1: 5}, {0: 1, 1: 4}, {0: 2, 1: 3}]
    assert v.rank_of(0, 4) == 0 and v.rank_of(5, 4) == 0  # inputs and loss on rank 0
    # stages 2 and 3 meet on rank 2: no p2p between them
    assert not any(a.kind in (SEND, RECV) and {a.stage, a.stage + (1 if a.what == "act" else -1)} == {2, 3}
                   for acts in v.ranks for a in acts)


def test_placement_helpers():
    d = build("dualpipe", 4, 8)
    assert d.copies(1) == [(1, 0), (2, 1)]  # stage 1: rank 1's chunk 0 and rank 2's chunk 1
    assert d.microbatches_entering(0) == [0, 1, 2, 3] and d.microbatches_entering(3) == [4, 5, 6, 7]
    assert d.microbatches_ending(3) == [0, 1, 2, 3] and d.microbatches_ending(0) == [4, 5, 6, 7]
    v = build("dualpipev", 2, 4)
    assert v.microbatches_entering(0) == v.microbatches_ending(0) == [0, 1, 2, 3]
    assert v.copies(3) == [(0, 1)]
    one = build("1f1b", 3, 2)
    assert one.microbatches_entering(0) == [0, 1] and one.microbatches_ending(2) == [0, 1]


@pytest.mark.parametrize("kind,pp,chunks", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                            ("dualpipev", 3, 7), ("gpipe", 2, 3)])
def test_forward_only(kind, pp, chunks):
    full = build(kind, pp, chunks)
    fwd = forward_only(full)
    validate(fwd)
    assert fwd.forward_only and not full.forward_only
    for r in range(pp):
        kinds = {a.kind for a in fwd.ranks[r]}
        assert kinds <= {F, SEND, RECV}
        assert all(a.what == "act" for a in fwd.ranks[r] if a.kind in (SEND, RECV))
        # the same forwards, in the same order
        assert [(a.stage, a.mb) for a in fwd.ranks[r] if a.kind == F] == [
            (a.stage, a.mb) for a in full.compute_actions(r) if a.kind in (F, FB)]
    with pytest.raises(ScheduleError, match="backward work in a forward-only schedule"):
        validate(dataclasses.replace(full, meta={"forward_only": True}))


def test_dualpipe_overlaps_forward_with_backward():
    s = build("dualpipe", 4, 16)
    fbs = [a for acts in s.ranks for a in acts if a.kind == FB]
    assert fbs
    for a in fbs:  # one micro-batch's forward with a different micro-batch's backward, both on this rank
        assert a.mb != a.b_mb


@pytest.mark.parametrize("kind,pp,chunks,msg", [
    ("dualpipe", 3, 12, "even number of pipeline ranks"),
    ("dualpipe", 4, 6, "chunks >= 2*pp"),
    ("dualpipe", 4, 9, "even number of chunks"),
    ("dualpipev", 4, 7, "chunks >= 2*pp"),
    ("1f1b", 0, 4, "pp (pipeline ranks) must be >= 1"),
    ("zb1p", 4, 0, "chunks (micro-batches) must be >= 1"),
    ("gpipe", 2.0, 4, "pp must be an int"),
    ("interleaved", 4, 8, "unknown schedule kind 'interleaved'; valid: gpipe, 1f1b, zb1p, dualpipe, dualp"),
])
def test_builder_rejects_bad_arguments(kind, pp, chunks, msg):
    with pytest.raises(ScheduleError, match=msg.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        build(kind, pp, chunks)


# ------------------------------------------------------------------------------------- broken schedules

def _edit(s, rank, fn):
    acts = list(s.ranks[rank])
    fn(acts)
    ranks = list(s.ranks)
    ranks[rank] = tuple(acts)
    return dataclasses.replace(s, ranks=tuple(ranks))


def _index(acts, pred):
    return next(i for i, a in enumerate(acts) if pred(a))


def _rejects(s, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        validate(s)


def test_validator_rejects_missing_backward():
    s = build("1f1b", 4, 8)
    _rejects(_edit(s, 2, lambda acts: acts.pop(_index(acts, lambda a: a.kind == B and a.mb == 5))),
             r"stage 2 mb 5: 0 B, 0 I, 0 W")


def test_validator_rejects_duplicate_forward():
    s = build("gpipe", 2, 3)
    _rejects(_edit(s, 0, lambda acts: acts.insert(0, acts[_index(acts, lambda a: a.kind == F)])),
             r"stage 0 mb 0: 2 forwards")


def test_validator_rejects_backward_before_its_forward():
    s = build("1f1b", 4, 6)

    def swap(acts):  # last rank: F0 B0 -> B0 F0
        i, j = _index(acts, lambda a: a.kind == F), _index(acts, lambda a: a.kind == B)
        acts[i], acts[j] = acts[j], acts[i]

    _rejects(_edit(s, 3, swap), r"rank 3: B0@s3 runs before its forward")


def test_validator_rejects_weight_grad_before_input_grad():
    s = build("zb1p", 4, 8)

    def swap(acts):
        i = _index(acts, lambda a: a.kind == BI and a.mb == 3)
        j = _index(acts, lambda a: a.kind == W and a.mb == 3)
        acts[i], acts[j] = acts[j], acts[i]

    _rejects(_edit(s, 1, swap), r"W3@s1 runs before its input-gradient backward")


def test_validator_rejects_unmatched_send():
    s = build("dualpipev", 2, 4)
    _rejects(_edit(s, 1, lambda acts: acts.pop(_index(acts, lambda a: a.kind == RECV))), r"1 SEND, 0 RECV")


def test_validator_rejects_wrong_peer():
    s = build("dualpipe", 4, 8)

    def repoint(acts):
        i = _index(acts, lambda a: a.kind == RECV)
        acts[i] = dataclasses.replace(acts[i], peer=(acts[i].peer + 2) % 4)

    _rejects(_edit(s, 1, repoint), r"goes from rank")


def test_validator_rejects_missing_transfer():
    s = build("1f1b", 3, 4)  # neither SEND nor RECV: the matching passes, the consumer has no input
    s = _edit(s, 0, lambda acts: acts.pop(_index(acts, lambda a: a.kind == SEND and a.mb == 2)))
    act2 = lambda a: a.kind == RECV and a.mb == 2 and a.what == "act"  # noqa: E731
    s = _edit(s, 1, lambda acts: acts.pop(_index(acts, act2)))
    _rejects(s, r"rank 1: F2@s1 runs before the activation of stage 0 mb 2 is on this rank")


def test_p2p_order_is_the_senders_order():
    for kind, pp, chunks in CASES:
        s = build(kind, pp, chunks)
        for src in range(pp):
            for dst in range(pp):
                sent = [(a.what, a.stage, a.mb) for a in s.ranks[src] if a.kind == SEND and a.peer == dst]
                got = [(a.what, a.stage, a.mb) for a in s.ranks[dst] if a.kind == RECV and a.peer == src]
                assert sent == got, (kind, pp, chunks, src, dst)


def test_validator_rejects_receives_out_of_order():
    s = build("1f1b", 2, 4)

    def swap(acts):  # rank 1 receives mb 1's activation before mb 0's
        i = _index(acts, lambda a: a.kind == RECV and a.mb == 0)
        j = _index(acts, lambda a: a.kind == RECV and a.mb == 1)
        acts[i], acts[j] = acts[j], acts[i]

    _rejects(_edit(s, 1, swap), r"p2p order rank 0->1: message 0 is sent as act of stage 0 mb 0 but received "
                                r"as act of stage 0 mb 1")


def test_validator_rejects_deadlock():
    s = build("1f1b", 2, 4)

    def early_wait(acts):  # rank 0 waits for mb 0's gradient before it sends mb 0's activation
        acts.insert(1, acts.pop(_index(acts, lambda a: a.kind == RECV and a.mb == 0)))

    _rejects(_edit(s, 0, early_wait), r"deadlock: rank 0 waits at action 1 \(RECV grad s1 mb0 <- r1\), "
                                      r"rank 1 waits at action 0 \(RECV act s0 mb0 <- r0\)")


def test_validator_rejects_action_on_wrong_rank():
    s = build("gpipe", 2, 2)
    moved = s.ranks[0][0]
    s = _edit(s, 0, lambda acts: acts.pop(0))
    s = _edit(s, 1, lambda acts: acts.insert(0, moved))
    _rejects(s, r"rank 1: F0@s0 belongs on rank 0")
