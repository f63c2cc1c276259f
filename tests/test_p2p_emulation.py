"""cluster/p2p.py: the NCCL p2p emulation over gloo on real ranks, and its agreement with the validator.

- the semantics on 3 spawned gloo ranks: cross sends posted alone time out naming the ops (plain gloo
  runs them), the same ops as groups complete, a group with two peers, messages matched in the wrong
  order are caught;
- under real mpirun (tests/p2p_cases.py): the lock-step program of every schedule at pp = 2, 4, 8 runs
  under the emulation, and the old per-op posting deadlocks exactly where the validator says it does.
"""

from __future__ import annotations

import re

import pytest
import torch
from dist_spawn import run_spawn

from cluster import p2p
from parallel.pipeline import ScheduleError, build, validate
from parallel.pipeline.lower import lower

KINDS = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


def test_backend_and_timeout_from_env() -> None:
    assert p2p.backend_from_env({}) == "torch"
    assert p2p.backend_from_env({"MOERUN_P2P": "nccl-emulated"}) == "nccl-emulated"
    with pytest.raises(ValueError, match="MOERUN_P2P='nccl' is not a p2p backend; valid: torch, nccl-emulated"):
        p2p.backend_from_env({"MOERUN_P2P": "nccl"})
    assert p2p.timeout_from_env({}) == p2p.DEFAULT_TIMEOUT_S
    assert p2p.timeout_from_env({"MOERUN_P2P_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="MOERUN_P2P_TIMEOUT=.* must be a number of seconds > 0"):
            p2p.timeout_from_env({"MOERUN_P2P_TIMEOUT": bad})
    with pytest.raises(ValueError, match="kind must be 'send' or 'recv'"):
        p2p.Op("isend", torch.zeros(1), 0)


def test_a_dry_runs_fake_group_gets_the_torch_channel_under_the_emulation() -> None:
    """`MOERUN_P2P=nccl-emulated moerun dryrun ...` (the variable exported for a whole session): the fake
    process group moves no messages, so its channel is torch's; the emulation would refuse it (not gloo)."""
    from cluster.fake import fake_mesh

    with fake_mesh(4, 1, pp=2, ep=2) as mesh:
        chan = p2p.channel(mesh.group("pp"), backend="nccl-emulated")
        assert isinstance(chan, p2p.TorchChannel)
        works = chan.post([p2p.Op("send", torch.ones(3), 3, "act"), p2p.Op("recv", torch.zeros(3), 3, "grad")])
        assert all(w.wait() for w in works)


def _cross(rank: int, backend: str, grouped: bool) -> str:
    """Ranks 0 and 1 each send one message to the other and then receive the other's: posted alone, each
    rank's first op is a send whose receive the peer posts behind its own send."""
    import torch.distributed as dist

    group = dist.new_group([0, 1])  # every rank creates every group
    if rank > 1:
        return "idle"
    chan = p2p.channel(group, backend=backend, timeout_s=2.0)
    peer = 1 - rank
    out = torch.full((3,), float(rank))
    got = torch.empty(3)
    ops = [p2p.Op("send", out, peer, f"from {rank}"), p2p.Op("recv", got, peer, f"from {peer}")]
    works = chan.post(ops) if grouped else [w for op in ops for w in chan.post([op])]
    try:
        for w in works:
            w.wait()
    except p2p.P2PTimeout as e:
        return f"timeout: {e}"
    assert torch.equal(got, torch.full((3,), float(peer))), got
    return "ok"


def _semantics(rank: int, world: int) -> None:
    import torch.distributed as dist

    # plain gloo forgives the cross order; the emulation, like NCCL, does not; one group per rank is fine
    assert _cross(rank, "torch", grouped=False) in ("ok", "idle")
    assert _cross(rank, "nccl-emulated", grouped=True) in ("ok", "idle")
    res = _cross(rank, "nccl-emulated", grouped=False)
    if rank < 2:
        assert res.startswith("timeout: nccl-emulated p2p: rank"), res
        assert f"its send from {rank} -> rank {1 - rank} (rank {1 - rank} has not started the matching receive): " \
               "not matched within 2 s (MOERUN_P2P_TIMEOUT)" in res, res
        assert f"#2 [recv from {1 - rank} <- rank {1 - rank}] (queued)" in res, res

    # a group with two peers: rank 0 sends to 1 and 2 at once, and receives from 2 in the same group
    group = dist.new_group([0, 1, 2])
    chan = p2p.channel(group, backend="nccl-emulated", timeout_s=30.0)
    if rank == 0:
        got = torch.empty(2)
        works = chan.post([p2p.Op("send", torch.tensor([1.0]), 1, "a"), p2p.Op("send", torch.tensor([2.0]), 2, "b"),
                           p2p.Op("recv", got, 2, "c")])
        assert len(works) == 3 and works[0] is works[2]  # one group, one work
        works[0].wait()
        assert got.tolist() == [3.0, 4.0]
    else:
        t = torch.empty(1)
        ops = [p2p.Op("recv", t, 0, "ab"[rank - 1])]
        if rank == 2:
            ops.append(p2p.Op("send", torch.tensor([3.0, 4.0]), 0, "c"))
        for w in chan.post(ops):
            w.wait()
        assert t.item() == float(rank)

    # matched by position: rank 0's first send meets rank 1's first receive, whatever they are called
    group = dist.new_group([0, 1])
    if rank < 2:
        chan = p2p.channel(group, backend="nccl-emulated", timeout_s=2.0)
    else:
        with pytest.raises(ValueError, match="needs a process group this rank belongs to"):
            p2p.channel(group, backend="nccl-emulated")
    if rank == 0:
        with pytest.raises(p2p.P2PError, match=r"rank 0's send act s0 mb0 -> rank 1 \(4 elements\) meets rank 1's "
                                               r"receive of act s0 mb1 \(4 elements\)"):
            chan.post([p2p.Op("send", torch.zeros(4), 1, "act s0 mb0")])[0].wait()
    elif rank == 1:
        with pytest.raises(p2p.P2PError):  # the data never comes: times out, or sees rank 0 give up
            chan.post([p2p.Op("recv", torch.empty(4), 0, "act s0 mb1")])[0].wait()


@pytest.mark.timeout(120)
def test_emulation_semantics_on_three_ranks() -> None:
    run_spawn(_semantics, 3)


def _specs() -> list[str]:
    specs = []
    for pp in (2, 4, 8):
        for kind in KINDS:
            chunks = {"dualpipe": 2 * pp, "dualpipev": 2 * pp + 1}.get(kind, pp + 3)
            specs += [f"{kind}:{pp}:{chunks}:lockstep", f"{kind}:{pp}:{chunks}:per-op"]
    return specs


def _validator_verdict(spec: str) -> str:
    kind, pp, chunks, lowering = spec.split(":")
    try:
        validate(lower(build(kind, int(pp), int(chunks)), lowering, check=False))
    except ScheduleError as e:
        assert "deadlock" in str(e), e
        return "deadlock"
    return "ok"


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_validator_and_emulation_agree_on_every_schedule() -> None:
    """8 ranks under mpirun, every schedule at pp = 2, 4, 8, lock-step and per-op posting: the emulated
    run deadlocks (times out) exactly where the validator says deadlock, and nowhere else."""
    from launchers import base_env, mpirun, mpirun_path

    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    specs = _specs()
    env = base_env(MOERUN_P2P="nccl-emulated", MOERUN_P2P_TIMEOUT="8")
    res = mpirun(8, [], env=env, python_args=["tests/p2p_cases.py", *specs], timeout=220)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    emulated = dict(re.findall(r"^CASE (\S+) (\w+)$", res.stdout, re.MULTILINE))
    assert sorted(emulated) == sorted(specs), out[-3000:]
    expected = {s: _validator_verdict(s) for s in specs}
    assert emulated == expected, (emulated, expected)
    # and what that is: lock-step never deadlocks, per-op posting deadlocks all but GPipe
    assert {s for s, v in expected.items() if v == "deadlock"} == {
        s for s in specs if s.endswith("per-op") and not s.startswith("gpipe")}
    notes = re.findall(r"^NOTE 1f1b:2:5:per-op rank \d: (.*)$", res.stdout, re.MULTILINE)
    assert any("has not started the matching receive): not matched within 8 s" in n for n in notes), notes
