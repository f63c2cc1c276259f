"""The shared scheduler: one loop on the driver rank decides, step by step, what every rank runs next.

Kinds of step: a serving step (one engine batch), a training micro-step's forward and, as its own step,
its backward (`split_backward`, on by default: a request waits at most for one half), an optimizer step
(gradient reductions, clip, AdamW, weight version + 1), a checkpoint (a `save` op, or a stopping server with
updates not yet saved; before anything else). The driver decides with a `Policy`, broadcasts a
small fixed-size int64 header over the job's CPU control group (no pickle), then any payload as int64 /
fp32 CPU tensors (a serving step's `StepPlan`, an RL batch), and all ranks run the step, so their
collectives (EP all-to-all, gradient all-reduce) line up. With no training work it is a serving loop.
Preemption happens only at step boundaries: a serving request that arrives during a training step waits
for that step to end.

Policies (with both kinds of work pending; otherwise whichever has work runs):
- `serve_first`: serving always; training fills the gaps when no request is waiting or running.
- `time_share`: a fraction `share` of the steps trains (a credit counter, exact over any window).
- `train_first`: training always, but at most `max_train_microsteps` training steps in a row while
  requests wait, so serving never starves.
`max_train_microsteps` also bounds consecutive training steps under `time_share`.

This module imports torch only inside functions: the policy logic is plain Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["Kind", "POLICIES", "SchedulerConfig", "Policy", "Scheduler", "HEADER_LEN", "scheduler_config"]

POLICIES = ("serve_first", "time_share", "train_first")
HEADER_LEN = 10


class Kind(IntEnum):
    IDLE = 0
    SERVE = 1
    TRAIN_MICRO = 2
    OPTIM = 3
    STOP = 4
    TRAIN_BWD = 5  # the backward half of a training micro-step (its forward ran in an earlier step)
    SAVE = 6  # a checkpoint of the weights as they are (a `save` op, or the server stopping)


@dataclass
class SchedulerConfig:
    policy: str = "serve_first"
    share: float = 0.5  # time_share: fraction of contested steps that train
    max_train_microsteps: int = 8  # training steps in a row at most while serving has work
    split_backward: bool = True  # forward and backward of a micro-step are separate steps (serving between)

    def validate(self) -> SchedulerConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler.policy = {self.policy!r} is not one of: {', '.join(POLICIES)}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"scheduler.share must be in [0, 1], got {self.share}")
        if self.max_train_microsteps < 1:
            raise ValueError(f"scheduler.max_train_microsteps must be >= 1, got {self.max_train_microsteps}")
        return self


def scheduler_config(config: dict) -> SchedulerConfig:
    """The `[scheduler]` section of a job config (runtime.jobconfig) as a validated SchedulerConfig."""
    s = config.get("scheduler", {})
    return SchedulerConfig(s.get("policy", "serve_first"), float(s.get("share", 0.5)),
                           int(s.get("max_train_microsteps", 8)), bool(s.get("split_backward", True))).validate()


class Policy:
    """Pure decision logic: `decide(serve_ready, train_ready) -> Kind` (SERVE, TRAIN or IDLE).

    TRAIN stands for the training queue's next step (micro or optimizer); the caller maps it."""

    TRAIN = Kind.TRAIN_MICRO

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg.validate()
        self.run = 0  # consecutive training steps while serving had work
        self.credit = 0.0

    def decide(self, serve_ready: bool, train_ready: bool) -> Kind:
        if not train_ready:
            self.run = 0
            return Kind.SERVE if serve_ready else Kind.IDLE
        if not serve_ready:
            self.run = 0
            return self.TRAIN
        c = self.cfg
        if self.run >= c.max_train_microsteps or c.policy == "serve_first":
            train = False
        elif c.policy == "train_first":
            train = True
        else:  # time_share
            self.credit += c.share
            train = self.credit >= 1.0 - 1e-9
            if train:
                self.credit -= 1.0
        self.run = self.run + 1 if train else 0
        return self.TRAIN if train else Kind.SERVE


@dataclass
class StepStats:
    """Counts and wall time per kind of step, for the metrics op and the bench."""

    counts: dict[str, int] = field(default_factory=lambda: {k.name.lower(): 0 for k in Kind})
    seconds: dict[str, float] = field(default_factory=lambda: {k.name.lower(): 0.0 for k in Kind})

    def add(self, kind: Kind, dt: float) -> None:
        self.counts[kind.name.lower()] += 1
        self.seconds[kind.name.lower()] += dt


# --- the header -------------------------------------------------------------------------------------------
# [kind, a, b, ... ] (HEADER_LEN ints). SERVE: a StepPlan follows (maybe the empty one).
# TRAIN_MICRO: a = source. 0 (job): b = optimizer step index, c = micro-batch (or pipelined slice) index,
# d = micro-batches (slices); 1 (rl, its first item: the batch follows): b = rows, c = columns, d = loss
# (0 ce, 1 grpo), e = has advantages, f = has old_logprobs, g = has kl, h = slices; 2 (a later slice of a
# pipelined rl op): b = slice index, c = slices.


class Scheduler:
    """Drives `engine` (runtime.serve.Engine) and `work` (runtime.sched.TrainWork, or None) on every rank.

    Driver (`is_driver`): call `step()` in a loop; it returns (kind, serving outputs). Other ranks: call
    `follow()` until it returns False. `group` is the job's CPU control group (`mesh.group("control")`,
    gloo) over which headers, step plans and train-op payloads travel as CPU tensors; None: one process.
    `progress` (e.g. `mesh.tick`) is called once per step, keepalive and followed step: the health
    watchdog's sign that this rank's loop moves (a hung rank is named from it)."""

    def __init__(self, engine, work=None, cfg: SchedulerConfig | None = None, weights=None, *, group=None,
                 src: int = 0, rank: int = 0, progress=None) -> None:
        from runtime.sched.weights import WeightVersions

        self.engine, self.work = engine, work
        self.policy = Policy(cfg or SchedulerConfig())
        self.weights = weights or WeightVersions(engine)
        if work is not None:
            work.weights = self.weights
        self.group, self.src, self.rank = group, src, rank
        self.progress = progress or (lambda: None)
        self.is_driver = group is None or rank == src
        self.stats = StepStats()
        self._plan_sent = False
        self._last_bcast = time.monotonic()
        if group is not None and self.is_driver:
            engine.plan_hook = self._send_plan
        self._publish()  # the gauges (weight_version, ...) exist before the first step: metrics may come first

    def has_work(self) -> bool:
        """Whether a step would run something (serving requests, or queued / job training)."""
        return self.engine.has_work() or (self.work is not None and (bool(self.work.saves) or self.work.has_work()))

    # --- broadcast ------------------------------------------------------------------------------------
    def bcast(self, t):
        """Broadcast a CPU tensor from the driver over the control group (in place; returned)."""
        import torch.distributed as dist

        if self.group is not None:
            dist.broadcast(t, src=self.src, group=self.group)
        return t

    def _header(self, kind: Kind, *args: int) -> list[int]:
        import torch

        self._last_bcast = time.monotonic()
        vals = [int(kind), *args] + [0] * (HEADER_LEN - 1 - len(args))
        return self.bcast(torch.tensor(vals, dtype=torch.int64, device="cpu")).tolist()

    def _send_plan(self, plan) -> None:
        plan.broadcast(self.bcast)
        self._plan_sent = True

    # --- driver ---------------------------------------------------------------------------------------
    def _train_ready(self) -> Kind | None:
        if self.work is None:
            return None
        kind = self.work.next_kind()
        if kind == Kind.OPTIM and not self.weights.update_allowed():
            return None  # pinned: serving drains first
        return kind

    def step(self) -> tuple[Kind, list]:
        """Decide, broadcast and run one step; (kind, serving outputs). IDLE runs nothing on any rank."""
        self.progress()
        if self.work is not None and self.work.saves:  # `save` ops go first: a checkpoint of the weights now
            t0 = time.perf_counter()
            self.save()
            self.stats.add(Kind.SAVE, time.perf_counter() - t0)
            return Kind.SAVE, []
        train_kind = self._train_ready()
        if train_kind == Kind.OPTIM and self.weights.drained:
            kind = Policy.TRAIN  # pinned: the update that requests were drained for, before new ones start
            self.weights.drained = False
        else:
            kind = self.policy.decide(self.engine.has_work(), train_kind is not None)
        if kind == Policy.TRAIN:
            kind = train_kind
        t0 = time.perf_counter()
        outputs: list = []
        if kind == Kind.SERVE:
            self._plan_sent = False
            if self.group is not None:
                self._header(Kind.SERVE)
            self._eval()
            outputs = self.engine.step()
            if self.group is not None and not self._plan_sent:
                from runtime.serve.step import StepPlan

                StepPlan.broadcast_none(self.bcast)
        elif kind == Kind.TRAIN_MICRO:
            self._micro()
        elif kind == Kind.TRAIN_BWD:
            self._backward()
        elif kind == Kind.OPTIM:
            if self.group is not None:
                self._header(Kind.OPTIM, *self.work.peek().header())
            self.work.run_optim(self.work.pop())
        if kind != Kind.IDLE:
            self.stats.add(kind, time.perf_counter() - t0)
            self._publish()
        return kind, outputs

    def _micro(self) -> None:
        item = self.work.peek()
        if self.group is not None:
            self._header(Kind.TRAIN_MICRO, *item.header())
            self.work.broadcast_payload(item, self.bcast)
        self.work.run_micro(self.work.pop(), backward=False)
        if not self.policy.cfg.split_backward and self.work.pending_backward():
            self._backward()

    def _backward(self) -> None:
        if self.group is not None:
            self._header(Kind.TRAIN_BWD)
        self.work.run_backward()

    def save(self) -> dict:
        """Driver: checkpoint on every rank now (a SAVE step); the result names it."""
        if self.group is not None:
            self._header(Kind.SAVE)
        return self.work.save()

    def shut_down(self, message: str) -> dict | None:
        """Driver, when the server stops (before `stop()`): answer queued training and `save` ops with
        `unavailable` / `message`, then checkpoint if an update was applied since the newest checkpoint.
        Returns that save's result (None: nothing to save)."""
        if self.work is None:
            return None
        while self.work.step_in_flight is not None and self.work.next_kind() == Kind.TRAIN_MICRO:
            self._micro()  # a pipelined step between slices: every rank runs its rest (its update is dropped)
        self.work.fail_all(message, code="unavailable")
        return self.save() if self.work.unsaved() else None

    def keepalive(self, every_s: float = 5.0) -> None:
        """Driver, while idle: an IDLE header every `every_s` seconds, so the other ranks' waiting
        broadcast never reaches the collective timeout."""
        self.progress()
        if self.group is not None and self.is_driver and time.monotonic() - self._last_bcast > every_s:
            self._header(Kind.IDLE)

    def stop(self) -> None:
        """Tell the other ranks to leave `follow()`."""
        if self.group is not None and self.is_driver:
            self._header(Kind.STOP)

    def _eval(self) -> None:
        # Serving runs the model in eval mode: no aux loss, no expert-load recording for the balancer.
        if self.engine.model.training:
            self.engine.model.eval()

    def _publish(self) -> None:
        g = self.engine.metrics.gauges
        g["weight_version"] = self.weights.version
        for k in ("serve", "train_micro", "train_bwd", "optim"):
            g[f"scheduler_{k}_steps"] = self.stats.counts[k]
            g[f"scheduler_{k}_seconds"] = round(self.stats.seconds[k], 6)
        if self.work is not None:
            for k, v in self.work.summary().items():
                g[f"train_{k}"] = v

    # --- other ranks ----------------------------------------------------------------------------------
    def follow(self) -> bool:
        """Receive and run one step; False once the driver sent STOP."""
        self.progress()
        head = self._header(Kind.IDLE)
        kind = Kind(head[0])
        if kind == Kind.STOP:
            return False
        if kind == Kind.SERVE:
            from runtime.serve.step import StepPlan

            plan = StepPlan.receive(self.bcast)
            if plan is not None:
                self._eval()
                self.engine.run_plan(plan)
        elif kind == Kind.TRAIN_MICRO:
            self.work.run_micro(self.work.receive_payload(head[1:], self.bcast), backward=False)
        elif kind == Kind.TRAIN_BWD:
            self.work.run_backward()
        elif kind == Kind.OPTIM:
            self.work.run_optim(self.work.receive_optim(head[1:]))
        elif kind == Kind.SAVE:
            self.work.save()
        return True
