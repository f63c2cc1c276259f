"""Pipeline executor and stage split: in-process checks, and every schedule under real mpirun against a
single-process reference (tests/executor_cases.py does the per-rank work)."""

from __future__ import annotations

import re

import pytest
import torch
from executor_cases import microbatches, reference, tiny_model

from parallel.pipeline import ScheduleError, build, lower
from parallel.pipeline.executor import PipelineExecutor
from parallel.pipeline.stages import build_stages, layer_split


def test_layer_split_is_balanced_and_contiguous() -> None:
    for layers in range(0, 13):
        for stages in range(1, 9):
            split = layer_split(layers, stages)
            assert len(split) == stages
            assert [i for r in split for i in r] == list(range(layers))
            sizes = [len(r) for r in split]
            assert max(sizes) - min(sizes) <= 1
            if stages > 2 and layers % stages and layers % stages <= stages - 2:
                assert sizes[0] == sizes[-1] == layers // stages  # extras go to interior stages first
    with pytest.raises(ValueError, match="num_stages"):
        layer_split(4, 0)


@pytest.mark.parametrize("kind,pp,chunks", [("1f1b", 4, 4), ("zb1p", 2, 4), ("dualpipe", 4, 8),
                                            ("dualpipev", 2, 4)])
def test_stages_cover_the_model(kind: str, pp: int, chunks: int) -> None:
    model = tiny_model()
    sched = build(kind, pp, chunks)
    seen: dict[str, int] = {}
    for r in range(pp):
        for chunk, stage in build_stages(model, sched, r).items():
            assert sched.stages_of(r)[chunk] == stage.stage
            for name, p in stage.full_named_parameters():
                assert p is dict(model.named_parameters())[name]
                seen[name] = seen.get(name, 0) + 1
    copies = 2 if kind == "dualpipe" else 1
    assert seen == {n: copies for n, _ in model.named_parameters()}


def test_chained_stages_equal_the_model() -> None:
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    split = layer_split(len(model.model.layers), 3)
    x = ids
    for s in range(3):
        x = model.pipeline_stage(s, 3, split[s])(x)
    torch.testing.assert_close(x.float(), model.logits(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "zb1p"])
def test_single_rank_executor_equals_reference(kind: str) -> None:
    """pp=1 needs no process group: the phase engine (F, B, or I then W) against plain autograd."""
    model, ref = tiny_model(), tiny_model()
    sched = build(kind, 1, 3)
    mbs = microbatches(model.config.vocab_size, 3)
    ref_losses = reference(ref, mbs)
    ex = PipelineExecutor(build_stages(model, sched, 0), sched, pp_ranks=[0], pp_rank=0)
    loss = ex.run_step(mbs)
    torch.testing.assert_close(loss, torch.stack(ref_losses).sum(), atol=1e-6, rtol=0)
    for m, v in ex.last_losses.items():
        torch.testing.assert_close(v, ref_losses[m], atol=1e-6, rtol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    # a second step accumulates, like loss.backward() twice
    ex.run_step(mbs)
    reference(ref, mbs)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_single_rank_forward_only() -> None:
    from parallel.pipeline import forward_only

    model = tiny_model()
    sched = forward_only(build("1f1b", 1, 2))
    mbs = microbatches(model.config.vocab_size, 2)
    ex = PipelineExecutor(build_stages(model, sched, 0), sched, pp_ranks=[0], pp_rank=0)
    logits = ex.run_forward([ids for ids, _ in mbs])
    for (ids, _), got in zip(mbs, logits, strict=True):
        torch.testing.assert_close(got, model.logits(ids), atol=1e-6, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ScheduleError, match="forward-only"):
        PipelineExecutor(build_stages(model, build("1f1b", 1, 2), 0), build("1f1b", 1, 2), pp_ranks=[0],
                         pp_rank=0).run_forward([ids for ids, _ in mbs])


def test_executor_rejects_bad_input() -> None:
    model = tiny_model()
    sched = build("1f1b", 2, 4)
    stages = build_stages(model, sched, 0)
    with pytest.raises(ScheduleError, match="must hold stages"):
        PipelineExecutor(stages, sched, pp_ranks=[0, 1], pp_rank=1)
    with pytest.raises(ScheduleError, match="pp=2 ranks but the pp group has 3"):
        PipelineExecutor(stages, sched, pp_ranks=[0, 1, 2], pp_rank=0)
    with pytest.raises(ValueError, match="needs a mesh"):
        PipelineExecutor(stages, sched)
    one = build("1f1b", 1, 2)
    ex = PipelineExecutor(build_stages(model, one, 0), one, pp_ranks=[0], pp_rank=0)
    with pytest.raises(ValueError, match="built for 2 micro-batches, got 3"):
        ex.run_step(microbatches(model.config.vocab_size, 3))
    import dataclasses

    from runtime.model.loading import build_model

    with_mtp = build_model(dataclasses.replace(model.config, num_nextn_predict_layers=1), mtp=True)
    two = build("1f1b", 2, 2)
    assert build_stages(with_mtp, two, 0)[0].mtp is None  # MTP lives on the last stage only
    last = build_stages(with_mtp, two, 1)[0]
    assert last.mtp is with_mtp.mtp and any(n.startswith("mtp.0.") for n, _ in last.full_named_parameters())


def test_executor_runs_lowered_programs_and_refuses_ones_that_deadlock() -> None:
    """A builder's schedule is lowered lock-step (DualPipe(V) included, no refusal); a lowered program that
    deadlocks under NCCL's semantics (the per-op posting) is refused unless check=False."""
    from parallel.pipeline.lower import lower

    model = tiny_model()
    sched = build("dualpipev", 2, 4)
    ex = PipelineExecutor(build_stages(model, sched, 0), sched, pp_ranks=[0, 1], pp_rank=0)
    assert ex.schedule.lowered == "lockstep" and ex.actions == lower(sched).ranks[0]
    old = lower(build("1f1b", 2, 4), "per-op")
    with pytest.raises(ScheduleError, match="deadlock under NCCL p2p semantics"):
        PipelineExecutor(build_stages(model, old, 0), old, pp_ranks=[0, 1], pp_rank=0)
    PipelineExecutor(build_stages(model, old, 0), old, pp_ranks=[0, 1], pp_rank=0, check=False)


CASES = ["1f1b:2:1:4", "1f1b:4:1:4", "zb1p:2:1:4", "dualpipe:2:1:4", "dualpipe:4:1:8", "dualpipev:2:1:4",
         "dualpipev:2:2:4"]


@pytest.mark.mpi
@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", ["torch", "nccl-emulated"])
def test_schedules_equal_reference_under_mpirun(backend: str) -> None:
    """4 ranks under real mpirun, each case on its own groups: pp=2 cases run two pipelines side by side
    (dp=2), dualpipev pp=2 x ep=2 uses the EP dispatcher's all-to-alls through the phase engine. Once on
    plain gloo, once under the NCCL p2p emulation (MOERUN_P2P=nccl-emulated: per-pair FIFO, rendezvous
    sends), where a program that could hang on NCCL fails within MOERUN_P2P_TIMEOUT instead."""
    from launchers import base_env, mpirun, mpirun_path

    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    env = base_env(MOERUN_P2P=backend, MOERUN_P2P_TIMEOUT="60")
    res = mpirun(4, [], env=env, python_args=["tests/executor_cases.py", *CASES], timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for case in CASES:
        kind, pp, ep, chunks = case.split(":")
        passed = re.findall(rf"PASS {kind} pp={pp} ep={ep} chunks={chunks} rank=(\d)", res.stdout)
        assert sorted(map(int, passed)) == [0, 1, 2, 3], (case, out[-3000:])


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_old_posting_order_hangs_under_nccl_emulation_only() -> None:
    """The executor's posting before lock-step lowering (each RECV posted alone and waited at once, each
    SEND alone) runs 1F1B pp=2 to parity on plain gloo, and under the NCCL emulation ends within the
    (short) p2p timeout with an error naming the stuck sends: the deadlock NCCL would hang in."""
    from launchers import base_env, mpirun, mpirun_path

    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    args = ["tests/executor_cases.py", "1f1b:2:1:4:per-op"]
    res = mpirun(2, [], env=base_env(MOERUN_P2P="torch"), python_args=args, timeout=120)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert sorted(re.findall(r"PASS 1f1b pp=2 ep=1 chunks=4 rank=(\d) per-op", res.stdout)) == ["0", "1"]
    # both ranks time out together; each first waits MOERUN_DEAD_AFTER_S for a root cause from the other
    env = base_env(MOERUN_P2P="nccl-emulated", MOERUN_P2P_TIMEOUT="3", MOERUN_DEAD_AFTER_S="4")
    res = mpirun(2, [], env=env, python_args=args, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "PASS" not in res.stdout, out[-3000:]
    assert "P2PTimeout" in out, out[-3000:]
    # whichever rank times out first names its stuck send (the other may see that rank give up first)
    assert re.search(r"rank (0: its send act s0 mb1 -> rank 1|1: its send grad s1 mb0 -> rank 0) \(rank [01] "
                     r"has not started the matching receive\): not matched within 3 s", out), out[-3000:]


SLICED = ["1f1b:2:1:4:sliced", "zb1p:4:1:8:sliced", "dualpipev:2:2:4:sliced", "dualpipe:2:1:4:sliced"]


@pytest.mark.mpi
@pytest.mark.timeout(420)
def test_steps_run_in_slices_with_other_work_between_them() -> None:
    """The shared scheduler serves between the slices of a pipelined training step (consistent cuts of the
    lowered program, `parallel.pipeline.validate.slices`): run slice by slice with a collective over another
    group after each, every schedule still reaches its cuts and equals the reference, under the NCCL p2p
    emulation (a cut that left a rank waiting for a later slice would time out there)."""
    from launchers import base_env, mpirun, mpirun_path

    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    env = base_env(MOERUN_P2P="nccl-emulated", MOERUN_P2P_TIMEOUT="60")
    res = mpirun(4, [], env=env, python_args=["tests/executor_cases.py", *SLICED], timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for case in SLICED:
        kind, pp, ep, chunks, _ = case.split(":")
        passed = re.findall(rf"PASS {kind} pp={pp} ep={ep} chunks={chunks} rank=(\d) sliced", res.stdout)
        assert sorted(map(int, passed)) == [0, 1, 2, 3], (case, out[-3000:])


def test_slices_are_consistent_cuts() -> None:
    """Every slice boundary is a point every rank reaches with only earlier slices' work from the others:
    the cuts end at each rank's program end, never go back, and each rank's compute actions per slice stay
    within the budget."""
    from parallel.pipeline.schedule import COMPUTE_KINDS
    from parallel.pipeline.validate import slices

    for kind, pp, chunks in [("1f1b", 4, 8), ("zb1p", 2, 4), ("dualpipev", 2, 8), ("dualpipe", 4, 8)]:
        low = lower(build(kind, pp, chunks))
        for computes in (1, 3):
            cuts = slices(low, computes)
            assert cuts[-1] == [len(r) for r in low.ranks]
            prev = [0] * pp
            for cut in cuts:
                assert all(c >= p for c, p in zip(cut, prev))
                for r in range(pp):
                    n = sum(a.kind in COMPUTE_KINDS for a in low.ranks[r][prev[r]:cut[r]])
                    assert n <= computes, (kind, r, n)
                prev = cut
    with pytest.raises(ScheduleError, match="lowered"):
        slices(build("1f1b", 2, 4))
