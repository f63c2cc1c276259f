"""The emulated link (FIFO clock arithmetic, no real waiting) and the phase engine's overlapped F&B on 2 EP
ranks: interleaving one micro-batch's forward with another's backward changes nothing numerically."""

from __future__ import annotations

import pytest
import torch
from dist_spawn import run_spawn

import parallel.link as link_mod
from parallel.link import DelayedWork, EmulatedLink


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


class FakeWork:
    def __init__(self) -> None:
        self.waited = 0

    def wait(self) -> bool:
        self.waited += 1
        return True

    def is_completed(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(link_mod.time, "perf_counter", c.perf_counter)
    monkeypatch.setattr(link_mod.time, "sleep", c.sleep)
    return c


def test_link_is_a_fifo_server(clock: FakeClock) -> None:
    link = EmulatedLink(bandwidth_gbps=8.0, latency_us=10.0)  # 8 Gbit/s = 1e9 bytes/s
    assert link.duration(1000) == pytest.approx(1e-6 + 10e-6)
    a = link.issue(1000)
    b = link.issue(3000)  # issued at the same instant: queued behind the first
    assert a == pytest.approx(100.0 + 11e-6)
    assert b == pytest.approx(100.0 + 1e-6 + 3e-6 + 10e-6)  # its bytes wait for the first's, not its latency
    clock.now = 200.0  # idle link: a new transfer starts when issued
    assert link.issue(0) == pytest.approx(200.0 + 10e-6)
    assert link.transfers == 3 and link.bytes == 4000
    assert link.total_s == pytest.approx(11e-6 + 13e-6 + 10e-6)


def test_delayed_work_waits_only_for_what_compute_did_not_cover(clock: FakeClock) -> None:
    link = EmulatedLink(latency_us=1000.0)
    works = [(FakeWork(), "buf0"), (FakeWork(), "buf1")]
    inner = [w for w, _ in works]
    link.wrap_works(works, nbytes=123)
    assert all(isinstance(w, DelayedWork) for w, _ in works) and [b for _, b in works] == ["buf0", "buf1"]
    clock.now += 400e-6  # compute that ran while the transfer travelled
    for w, _ in works:
        w.wait()
    assert [w.waited for w in inner] == [1, 1]
    assert clock.slept == [pytest.approx(600e-6)]  # one sleep: both works share one arrival
    assert link.exposed_s == pytest.approx(600e-6) and link.transfers == 1
    clock.now += 5.0
    late = link.wrap(FakeWork(), 0)
    clock.now += 1.0  # compute longer than the transfer: fully hidden
    late.wait()
    assert len(clock.slept) == 1 and late.is_completed()


def test_link_config() -> None:
    assert EmulatedLink.from_config(None) is None
    assert EmulatedLink.from_config({"bandwidth_gbps": 0, "latency_us": 0}) is None
    link = EmulatedLink.from_config({"bandwidth_gbps": 100, "latency_us": 5})
    assert link is not None and link.enabled and link.latency_us == 5
    with pytest.raises(ValueError, match="unknown parallel.emulate_link keys.*bandwidth"):
        EmulatedLink.from_config({"bandwidth": 1})
    with pytest.raises(ValueError, match="bandwidth_gbps >= 0"):
        EmulatedLink(bandwidth_gbps=-1)


def _pair_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from executor_cases import microbatches, reference, tiny_model

    from parallel.expert import Dispatcher
    from parallel.pipeline.overlap import run, run_pair, stage_backward, stage_forward
    from parallel.shard import all_reduce_data_parallel_grads, gather_full
    from runtime.model.loading import shard_model

    group = dist.group.WORLD
    mbs = microbatches(96, 2, batch=2, seq=6)
    total = sum(int((lab != -100).sum()) for _, lab in mbs)
    ref = tiny_model()
    ref_losses = reference(ref, mbs)
    results = {}
    for mode in ("sequential", "overlapped"):
        link = EmulatedLink(latency_us=300.0)
        base = tiny_model()
        model = shard_model(base, Dispatcher(base.config.n_routed_experts, group, link=link))
        stage = model.pipeline_stage(0, 1, range(len(model.model.layers)))

        def fwd(m: int, stage=stage):
            return stage_forward(stage, mbs[m][0], mbs[m][1], total, 0.5)

        out0, tape0 = run(fwd(0))
        if mode == "sequential":
            out1, tape1 = run(fwd(1))
            run(stage_backward(tape0, torch.ones_like(out0)))
        else:  # mb 1's forward interleaved with mb 0's backward, phase by phase
            (out1, tape1), _ = run_pair(fwd(1), stage_backward(tape0, torch.ones_like(out0)))
        run(stage_backward(tape1, torch.ones_like(out1)))
        moe_layers = sum(layer.is_moe for layer in model.model.layers)
        assert link.transfers == 2 * 2 * 2 * moe_layers  # (dispatch, combine) x (F, B) x 2 micro-batches
        assert link.total_s > 0
        ce = [float(out.detach()) + 0.5 * sum(float(a) for node in tape for a in getattr(node, "aux", ()))
              for out, tape in ((out0, tape0), (out1, tape1))]
        all_reduce_data_parallel_grads(model, group, None)
        results[mode] = (ce, gather_full(model, None, group, grads=True))
    for mode, (ce, grads) in results.items():
        for m in range(2):  # the loss term: CE / total tokens + aux / 2
            assert abs(ce[m] - float(ref_losses[m])) < 1e-6, (mode, m, ce[m], float(ref_losses[m]))
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=f"{mode} {name}")
    seq, ovl = results["sequential"][1], results["overlapped"][1]
    for name in seq:
        assert torch.equal(seq[name], ovl[name]), f"overlap changed the gradient of {name}"


@pytest.mark.timeout(180)
def test_overlapped_pair_equals_sequential_on_two_ep_ranks() -> None:
    run_spawn(_pair_worker, 2)
