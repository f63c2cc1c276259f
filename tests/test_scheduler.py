"""The shared scheduler's policy logic with fake engines, the plan wire format, and the config section."""

from __future__ import annotations

import pytest

from runtime.sched.scheduler import Kind, Policy, Scheduler, SchedulerConfig


class FakeMetrics:
    def __init__(self) -> None:
        self.gauges: dict = {}


class FakePrefix:
    def __init__(self) -> None:
        self.clears = 0

    def clear(self) -> None:
        self.clears += 1


class FakeEngine:
    """Serves `pending` one-step requests; records the order of steps in a shared log."""

    def __init__(self, log: list) -> None:
        self.log, self.pending = log, 0
        self.running, self.waiting, self.max_batch = [], [], 8
        self.metrics = FakeMetrics()
        self.model = type("M", (), {"training": False})()
        self.cache = type("C", (), {"prefix": FakePrefix()})()

    def has_work(self) -> bool:
        return self.pending > 0

    def step(self) -> list:
        self.log.append("S")
        self.pending -= 1
        return ["out"]


class FakeItem:
    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def header(self) -> tuple:
        return ()


class FakeWork:
    """A training job of `steps` optimizer steps of `micros` micro-steps each."""

    def __init__(self, log: list, steps: int, micros: int = 2) -> None:
        self.log, self.weights = log, None
        self.queue = [FakeItem(Kind.TRAIN_MICRO) for _ in range(micros)] + [FakeItem(Kind.OPTIM)]
        self.queue = self.queue * steps
        self.saves: list = []  # `save` ops waiting

    def save(self) -> dict:
        self.log.append("S")
        self.saves.clear()
        return {}

    def next_kind(self):
        return self.queue[0].kind if self.queue else None

    def has_work(self) -> bool:
        return bool(self.queue)

    def peek(self):
        return self.queue[0]

    def pop(self):
        return self.queue.pop(0)

    def run_micro(self, item, backward: bool = True) -> None:
        self.log.append("m")

    def pending_backward(self) -> bool:
        return False

    def run_optim(self, item) -> None:
        self.log.append("O")
        self.weights.bump()

    def summary(self) -> dict:
        return {"queue": len(self.queue)}


def _drive(policy: str, serve: int, steps: int, micros: int = 2, **kw) -> tuple[str, Scheduler]:
    log: list = []
    eng, work = FakeEngine(log), FakeWork(log, steps, micros)
    eng.pending = serve
    sched = Scheduler(eng, work, SchedulerConfig(policy, **kw))
    for _ in range(10_000):
        kind, _ = sched.step()
        if kind == Kind.IDLE:
            break
    return "".join(log), sched


def test_serve_first_trains_only_in_the_gaps():
    order, sched = _drive("serve_first", serve=5, steps=2)
    assert order == "SSSSS" + "mmO" * 2
    assert sched.weights.version == 2 and sched.engine.metrics.gauges["weight_version"] == 2
    assert sched.engine.cache.prefix.clears == 2  # stale prefix latents dropped at every update
    assert sched.stats.counts == {"idle": 0, "serve": 5, "train_micro": 4, "optim": 2, "stop": 0, "train_bwd": 0,
                                  "save": 0}


def test_a_save_op_runs_before_anything_else():
    """A `save` op waiting: the next step is the checkpoint, whatever serving and training have pending."""
    log: list = []
    eng, work = FakeEngine(log), FakeWork(log, steps=2)
    sched = Scheduler(eng, work, SchedulerConfig("train_first"))
    sched.step()
    eng.pending = 2
    work.saves.append(lambda result: None)
    assert sched.has_work()
    kinds = [sched.step()[0] for _ in range(3)]
    assert kinds[0] == Kind.SAVE and "".join(log)[:2] == "mS" and not work.saves
    assert sched.stats.counts["save"] == 1


def test_gauges_exist_before_the_first_step():
    """A metrics request may arrive before any scheduler step (`serve --train` right after start-up)."""
    log: list = []
    sched = Scheduler(FakeEngine(log), FakeWork(log, steps=1), SchedulerConfig("serve_first"))
    gauges = sched.engine.metrics.gauges
    assert gauges["weight_version"] == 0 and gauges["scheduler_serve_steps"] == 0 and "train_queue" in gauges


def test_a_request_arriving_during_training_runs_at_the_next_step_boundary():
    log: list = []
    eng, work = FakeEngine(log), FakeWork(log, steps=3)
    sched = Scheduler(eng, work, SchedulerConfig("serve_first"))
    sched.step()
    sched.step()  # two training steps: nothing to serve
    eng.pending = 2  # requests arrive during the second training step
    sched.step()
    sched.step()
    sched.step()
    assert "".join(log) == "mmSSO"


def test_time_share_gives_training_its_fraction_exactly():
    order, _ = _drive("time_share", serve=100, steps=100, micros=1, share=0.25, max_train_microsteps=8)
    contested = order[: order.rindex("S") + 1]  # while serving had work
    n_train = sum(c != "S" for c in contested)
    assert n_train == 33 and contested.count("S") == 100  # 1/4 of 133 steps, rounded by the credit
    assert "SSSS" not in contested  # never more than 3 serving steps between training steps
    order, _ = _drive("time_share", serve=10, steps=5, share=0.0)
    assert order.startswith("S" * 10)
    order, _ = _drive("time_share", serve=10, steps=10, share=1.0, max_train_microsteps=4)
    assert order.startswith("mmOm" + "S" + "mOmm" + "S")  # share 1 still lets serving in after 4


def test_train_first_bounds_the_training_run_while_requests_wait():
    order, _ = _drive("train_first", serve=3, steps=4, max_train_microsteps=3)
    assert order.startswith("mmOS" + "mmOS" + "mmOS")
    assert order.count("S") == 3 and order.count("O") == 4


def test_policy_alone_and_bad_configs():
    p = Policy(SchedulerConfig("serve_first"))
    assert p.decide(False, False) == Kind.IDLE
    assert p.decide(True, False) == Kind.SERVE
    assert p.decide(False, True) == Policy.TRAIN
    with pytest.raises(ValueError, match="scheduler.policy"):
        SchedulerConfig("fastest").validate()
    with pytest.raises(ValueError, match="scheduler.share"):
        SchedulerConfig("time_share", share=1.5).validate()
    with pytest.raises(ValueError, match="max_train_microsteps"):
        SchedulerConfig(max_train_microsteps=0).validate()


def test_config_section_and_overrides():
    from runtime.jobconfig import ConfigError, load_config
    from runtime.sched.scheduler import scheduler_config

    cfg = load_config(None, ["scheduler.policy=time_share", "scheduler.share=0.3", "serve.pin_weights=true"])
    sc = scheduler_config(cfg)
    assert (sc.policy, sc.share, sc.max_train_microsteps) == ("time_share", 0.3, 8)
    assert cfg["serve"]["pin_weights"] is True
    with pytest.raises(ConfigError, match="scheduler.policy"):
        load_config(None, ["scheduler.policy=nope"])
    with pytest.raises(ConfigError, match="scheduler.quantum"):
        load_config(None, ["scheduler.quantum=3"])


def test_step_plan_round_trips_through_the_flat_encoding():
    from runtime.serve.step import StepPlan

    plan = StepPlan()
    plan.add([5, 6, 7], 0, [3, 9], 2, True)
    plan.add([11], 4, [1, 2, 8], 2, True)
    plan.add([1, 2], 2, [4, 0], 2, False)
    back = StepPlan.decode(plan.encode())
    assert back == plan
    empty = StepPlan.decode(StepPlan().encode())
    assert len(empty) == 0 and empty.ids == []


class FakeRequest:
    def __init__(self, steps: int) -> None:
        self.left, self.output, self.versions = steps, [], []


class BatchingEngine(FakeEngine):
    """Admits waiting requests up to max_batch; each running request emits one token per step."""

    def __init__(self, log: list, weights_ref: list) -> None:
        super().__init__(log)
        self.weights_ref = weights_ref

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list:
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.pop(0))
        self.log.append("S")
        for r in list(self.running):
            r.output.append(0)
            r.versions.append(self.weights_ref[0].version)
            r.left -= 1
            if r.left == 0:
                self.running.remove(r)
        return []


def test_pinned_update_drains_started_requests_then_runs_before_new_ones():
    from runtime.sched.weights import WeightVersions

    log: list = []
    ref: list = []
    eng = BatchingEngine(log, ref)
    first = [FakeRequest(3), FakeRequest(4)]
    eng.waiting = list(first)
    weights = WeightVersions(eng, pin=True)
    ref.append(weights)
    work = FakeWork(log, steps=2)
    queued, work.queue = work.queue, []
    sched = Scheduler(eng, work, SchedulerConfig("train_first", max_train_microsteps=4), weights)
    sched.step()  # S: both start on version 0; then the training job arrives
    work.queue = queued
    late = [FakeRequest(2), FakeRequest(2)]
    eng.waiting += late  # arrive while the first two run
    for _ in range(40):
        if sched.step()[0] == Kind.IDLE:
            break
    for r in first + late:
        assert len(set(r.versions)) == 1, r.versions  # each request saw one version
    assert first[0].versions[0] == first[1].versions[0] == 0
    assert late[0].versions[0] == late[1].versions[0] == 2  # not started before the updates: they wait
    assert eng.max_batch == 8 and weights._cap is None  # admission restored
    assert weights.version == 2 and eng.cache.prefix.clears == 2
    # micro-steps go on while the update waits for the two started requests (3 more serving steps)
    assert "".join(log) == "S" + "mm" + "SSS" + "O" + "mmO" + "SS"


def test_pipelined_training_takes_every_loss_and_schedule():
    """Under pp every train op's loss runs (the last stage computes it), on every schedule; only the KL term
    still needs the frozen reference switched on."""
    from runtime.sched.work import TrainWork

    class T:
        pp, model, pipelined, step, slice_count = 2, None, True, 0, 5

    work = TrainWork(T())
    assert work.supports("ce") is None and work.supports("grpo") is None
    assert "kl_reference" in work.supports("grpo", kl_coef=0.1)
    # a train op under pp is one queue item per slice, then its optimizer step: serving can come between;
    # only the first slice carries the batch (header source 1), later ones name their slice (source 2)
    import torch

    from runtime.sched.rl import RLBatch

    batch = RLBatch(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4), None, None, "ce", 0.0)
    done: list[dict] = []
    work.submit(batch, on_done=done.append)
    kinds = [(int(i.kind), i.micro) for i in work.queue]
    assert kinds == [(int(Kind.TRAIN_MICRO), k) for k in range(5)] + [(int(Kind.OPTIM), 0)]
    heads = [i.header() for i in list(work.queue)[:5]]
    assert heads[0][0] == 1 and heads[0][-1] == 5 and [h[:3] for h in heads[1:]] == [(2, k, 5) for k in range(1, 5)]
    assert all(i.on_done is None for i in list(work.queue)[:5]) and work.queue[5].on_done is not None
    sent: list = []
    for item in list(work.queue)[:5]:
        work.broadcast_payload(item, sent.append)
    assert len(sent) == 2  # the first slice's ids and mask only
