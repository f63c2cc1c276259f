"""Training as schedulable steps on the serving model: `TrainWork` wraps a `runtime.train.Trainer` (through
its public API: batch, microbatch_slices, forward_backward, pipeline_parts, apply_gradients, mean_over_dp,
save).

The Trainer's `train_step` runs a whole optimizer step at once; the shared scheduler needs finer steps it
can interleave with serving: micro-steps (forward + backward of one micro-batch, gradients accumulate) and
optimizer steps. `TrainWork` keeps a FIFO of such items from two sources:
- the config's training job (`[train]`/`[data]`): optimizer step s is the Trainer's micro-batches of
  `data.batch(s)` followed by one optimizer step, enqueued only when nothing else is accumulating;
- `train` ops (RL rollouts, SFT batches) over ZeroMQ: one micro-step each, plus an optimizer step when
  the op asks for one (`optimizer_step`, default true).
The optimizer step is `Trainer.apply_gradients` (TP/DP gradient reductions, global norm, clip, ZeRO-1
AdamW, bias update), then the weight version is bumped. Gradients of k accumulated `train` ops are
averaged (each op's loss is a token mean over its own loss mask). Once an update is applied it stays
applied: a metrics line or checkpoint that cannot be written afterwards (a full disk) is reported in the
op's result (`save_error`) and on stderr, and training goes on; the job's data cursor has moved with the
update, so nothing is applied twice or skipped. Under pipeline parallelism a job step
or a `train` op is one run of the pipeline schedule over its micro-batches, taken in slices (one item
each: runtime/sched/pipelined.py), so serving steps can come between them; every loss works there too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.sched.rl import RLBatch, batch_loss
from runtime.sched.scheduler import Kind

__all__ = ["TrainItem", "TrainWork"]

LOSS_CODES = {"ce": 0, "grpo": 1}


@dataclass
class TrainItem:
    kind: Kind
    source: str = "job"  # "job" | "rl"
    step: int = 0  # job: the optimizer step whose data this is
    micro: int = 0
    micros: int = 1
    batch: RLBatch | None = None
    on_done: Callable[[dict], None] | None = None  # rl: called with the op's result after its last step
    result: dict = field(default_factory=dict)

    def header(self) -> tuple[int, ...]:
        if self.kind == Kind.OPTIM:
            return (0 if self.source == "job" else 1,)
        if self.source == "job":
            return (0, self.step, self.micro, self.micros)
        if self.micro > 0:  # a later slice of a pipelined train op: the other ranks have its batch
            return (2, self.micro, self.micros)
        b = self.batch
        return (1, b.input_ids.shape[0], b.input_ids.shape[1], LOSS_CODES[b.loss],
                int(b.advantages is not None), int(b.old_logprobs is not None), int(b.kl_coef > 0), self.micros)


class TrainWork:
    """The training side of the shared scheduler, on every rank (the driver fills the queue)."""

    def __init__(self, trainer, job_steps: int = 0, clip_eps: float = 0.2, reference: bool = False,
                 record: bool = False) -> None:
        self.pipelined = trainer.pipelined
        self.step_in_flight = None  # a pipelined step between its slices (runtime/sched/pipelined.py)
        self.trainer = trainer
        self.model = trainer.model
        self.queue: deque[TrainItem] = deque()
        self.weights = None  # set by the Scheduler
        self.job_left = job_steps
        # The job's data cursor: job step k reads data.batch(k). It starts at the Trainer's step (a resumed
        # run) and advances with job steps only, so `train` ops in between do not skip data windows.
        self.job_cursor = trainer.step
        self.clip_eps = clip_eps
        self.pending_rl = 0  # train ops accumulated since the last optimizer step
        self.pending_micro = 0
        self.last: dict[str, Any] = {}
        self.current: TrainItem | None = None  # the item being run (answered with an error if it fails)
        self._bwd: tuple | None = None  # a micro-step whose backward has not run yet
        self.tokens_total = 0
        self.job_steps_done = 0
        self.save_failures = 0  # checkpoints and metrics lines that could not be written
        self.saved_step = trainer.step  # the optimizer step of the newest checkpoint (resumed from or written)
        self.saves: list[Callable[[dict], None]] = []  # `save` ops waiting for the next step (driver)
        self._t0 = time.perf_counter()
        self._acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}  # since the last optimizer step
        # `record`: like `moerun train`, rank 0 appends one metrics.jsonl line per optimizer step (job and
        # train ops alike, with "source"), and every rank saves a checkpoint every train.save_every steps.
        self.metrics_file = None
        if record and getattr(trainer, "rank", 0) == 0:
            from runtime.train.metrics import MetricsFile

            self.metrics_file = MetricsFile(trainer.config["train"]["out"], trainer.step)
        self.record = record
        # Optional frozen reference for GRPO's KL term: a second copy of the weights as they are now (off by
        # default; the only thing here that costs a copy). Built the way the Trainer built its model.
        self.ref_model = self._frozen_copy() if reference else None

    # --- queue ----------------------------------------------------------------------------------------
    def submit(self, batch: RLBatch, optimizer_step: bool = True,
               on_done: Callable[[dict], None] | None = None) -> None:
        """Queue one `train` op: a micro-step (and an optimizer step if asked); `on_done(result)` after."""
        n = self.trainer.slice_count if self.pipelined else 1  # pipelined: the step's slices
        micro = TrainItem(Kind.TRAIN_MICRO, "rl", batch=batch, micros=n, on_done=None if optimizer_step else on_done)
        self.queue.append(micro)
        for k in range(1, n):
            self.queue.append(TrainItem(Kind.TRAIN_MICRO, "rl", batch=batch, micro=k, micros=n, result=micro.result,
                                        on_done=micro.on_done))
        micro.on_done = None if n > 1 else micro.on_done  # answered after its last slice
        if optimizer_step:
            self.queue.append(TrainItem(Kind.OPTIM, "rl", on_done=on_done, result=micro.result))

    def _fill_from_job(self) -> None:
        if self.queue or self.job_left <= 0 or self.pending_micro or self._bwd is not None:
            return
        t = self.trainer
        inputs, _ = t.batch(self.job_cursor)
        # pipelined: the step's slices (a pipelined step runs whole micro-batch schedules in slices)
        n = t.slice_count if self.pipelined else len(t.microbatch_slices(inputs.shape[0]))
        for i in range(n):
            self.queue.append(TrainItem(Kind.TRAIN_MICRO, "job", step=self.job_cursor, micro=i, micros=n))
        self.queue.append(TrainItem(Kind.OPTIM, "job", step=self.job_cursor))
        self.job_left -= 1

    def next_kind(self) -> Kind | None:
        if self.pending_backward():
            return Kind.TRAIN_BWD
        self._fill_from_job()
        return self.queue[0].kind if self.queue else None

    def queued_bytes(self) -> int:
        """Bytes of the batches waiting in the queue (`serve.max_train_queue_bytes` bounds them)."""
        return sum(item.batch.nbytes for item in self.queue if item.batch is not None)

    def peek(self) -> TrainItem:
        return self.queue[0]

    def pop(self) -> TrainItem:
        return self.queue.popleft()

    def has_work(self) -> bool:
        return self.next_kind() is not None

    def fail_all(self, message: str, code: str = "internal") -> None:
        """After a failed step, or when the server stops: drop the accumulated gradients and answer every
        queued op (and waiting `save` op) with an error of protocol code `code`."""
        items = ([self.current] if self.current is not None else []) + list(self.queue)
        self.current, self._bwd = None, None
        for item in items:
            if item.on_done is not None:
                item.on_done({"error": message, "code": code})
        saves, self.saves = self.saves, []
        for on_done in saves:
            on_done({"error": message, "code": code})
        self.queue.clear()
        for p in self.model.parameters():
            p.grad = None
        self.pending_rl = self.pending_micro = 0
        self._acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
        if any(item.source == "job" for item in items):
            self.job_left += 1  # the failed job step is retried (same data)

    # --- payload for the other ranks --------------------------------------------------------------------
    def broadcast_payload(self, item: TrainItem, bcast: Callable) -> None:
        """Driver: a train op's batch to the other ranks (CPU tensors over the control group)."""
        if item.source != "rl" or item.micro > 0:
            return  # job batches: every rank reads its own data share; a later slice: the ranks have its batch
        b = item.batch
        bcast(b.input_ids.cpu())
        bcast(b.loss_mask.cpu())
        if b.advantages is not None:
            bcast(b.advantages.cpu())
        if b.old_logprobs is not None:
            bcast(b.old_logprobs.cpu())
        if b.kl_coef > 0:
            bcast(torch.tensor([b.kl_coef], dtype=torch.float64, device="cpu"))

    def receive_payload(self, head: list[int], bcast: Callable) -> TrainItem:
        """The other ranks' side of `broadcast_payload` (head: the step header's fields after the kind)."""
        if head[0] == 0:
            return TrainItem(Kind.TRAIN_MICRO, "job", step=head[1], micro=head[2], micros=head[3])
        if head[0] == 2:
            return TrainItem(Kind.TRAIN_MICRO, "rl", micro=head[1], micros=head[2])
        rows, cols, loss, has_adv, has_old, has_kl, micros = head[1:8]
        ids = bcast(torch.zeros(rows, cols, dtype=torch.int64, device="cpu"))
        mask = bcast(torch.zeros(rows, cols, dtype=torch.float32, device="cpu"))
        adv = bcast(torch.zeros(rows, dtype=torch.float32, device="cpu")) if has_adv else None
        old = bcast(torch.zeros(rows, cols, dtype=torch.float32, device="cpu")) if has_old else None
        kl = float(bcast(torch.zeros(1, dtype=torch.float64, device="cpu"))[0]) if has_kl else 0.0
        name = {v: k for k, v in LOSS_CODES.items()}[loss]
        return TrainItem(Kind.TRAIN_MICRO, "rl", batch=RLBatch(ids, mask, adv, old, name, kl), micros=micros)

    def receive_optim(self, head: list[int]) -> TrainItem:
        """The other ranks' copy of an optimizer step (its source sets the learning-rate rule)."""
        return TrainItem(Kind.OPTIM, "job" if head[0] == 0 else "rl")

    # --- steps ----------------------------------------------------------------------------------------
    def run_micro(self, item: TrainItem, backward: bool = True) -> None:
        """Forward (and, with `backward`, backward) of one micro-step. Without it the graph waits for
        `run_backward()`, so the scheduler can serve between the two halves of a training micro-step."""
        t = self.trainer
        t0 = time.perf_counter()
        self.current = item
        self.model.train()
        stats: dict[str, float] = {}
        loss = None
        if self.pipelined:
            done = self._pipelined_slice(item)
            if done is None:  # a slice before the step's last: nothing to account yet
                self.current = None
                return
            ce, tokens, stats = done
            self.pending_rl += item.source == "rl"
        elif item.source == "job":
            inputs, labels = t.batch(item.step)
            sl = t.microbatch_slices(inputs.shape[0])[item.micro]
            out, parts = self.model(inputs[sl], labels[sl])
            loss = out / item.micros
            ce, tokens = float(parts["ce"].detach()), int(labels[sl].numel())
        else:
            b = item.batch
            b = RLBatch(b.input_ids.to(t.device), b.loss_mask.to(t.device), b.advantages, b.old_logprobs, b.loss,
                        b.kl_coef)
            out, stats = batch_loss(self.model, b, self.clip_eps, self.ref_model)
            aux = [m.last_aux_loss for m in self.model.modules()
                   if getattr(m, "last_aux_loss", None) is not None]
            loss = out + (torch.stack(aux).sum() if aux else 0.0)
            ce, tokens = float(out.detach()), b.tokens
            self.pending_rl += 1
        self._bwd = (item, loss, ce, tokens, stats, time.perf_counter() - t0)
        if backward or loss is None:
            self.run_backward()

    def pending_backward(self) -> bool:
        return self._bwd is not None and self._bwd[1] is not None

    def run_backward(self) -> None:
        """The second half of a micro-step (a no-op for pipelined ones, which ran whole)."""
        item, loss, ce, tokens, stats, spent = self._bwd
        self._bwd = None
        t0 = time.perf_counter()
        if loss is not None:
            self.model.train()
            loss.backward()
        self.pending_micro += 1
        self.tokens_total += tokens
        a = self._acc
        a["loss"], a["n"], a["tokens"] = a["loss"] + ce, a["n"] + 1, a["tokens"] + tokens
        a["time"] += spent + time.perf_counter() - t0
        item.result.update(loss=ce, tokens=tokens, **stats)
        self.last = {"loss": ce, "source": item.source}
        self.current = None
        if item.on_done is not None:  # a train op without an optimizer step
            item.on_done(self._result(item.result))

    def _pipelined_slice(self, item: TrainItem) -> tuple[float, int, dict] | None:
        """Slice `item.micro` of a pipelined step (the first one starts it: the job's data or the op's batch
        as the schedule's micro-batches); after the last, (ce, tokens, stats)."""
        from runtime.sched.pipelined import PipelinedStep, rl_microbatches

        t = self.trainer
        if item.micro == 0:
            if item.source == "job":
                inputs, labels = t.batch(item.step)
                mbs = [(inputs[sl], labels[sl]) for sl in t.microbatch_slices(inputs.shape[0])]
                self.step_in_flight = (PipelinedStep(t, mbs), int(labels.numel()))
            else:
                mbs, _ = rl_microbatches(item.batch, t.microbatches, t.device)
                self.step_in_flight = (PipelinedStep(t, mbs, item.batch, self.clip_eps, self.ref_model),
                                       item.batch.tokens)
        step, tokens = self.step_in_flight
        step.run_slice(item.micro)
        if item.micro < item.micros - 1:
            return None
        self.step_in_flight = None
        parts = step.finish()
        stats = {k: parts[k] for k in ("clip_frac", "kl") if k in parts}
        return parts["ce"], tokens, stats

    def supports(self, loss: str, kl_coef: float = 0.0) -> str | None:
        """Why a `train` op with this loss cannot run here (None: it can)."""
        if kl_coef > 0 and self.ref_model is None:
            return "kl_coef > 0 needs a frozen reference: start the server with scheduler.kl_reference = true"
        return None

    def _frozen_copy(self):
        """A frozen copy of the weights as they are now, built the way the Trainer built its model; under pp,
        its stages behind a forward-only executor of the job's schedule (the KL term's log-probabilities
        then come out on the rank whose last stage computes the loss)."""
        from runtime.model.loading import load_model

        t = self.trainer
        ref = load_model(t.config["model"]["path"], t.mesh, dtype=t.dtype, device=str(t.device),
                         seed=t.config["train"]["seed"], mtp=False, schedule=t.config["parallel"]["schedule"],
                         max_nodes_per_token=t.config["parallel"]["max_nodes_per_token"])
        res = ref.load_state_dict(self.model.state_dict(), strict=False)  # the weights as they are now
        if res.missing_keys:
            raise RuntimeError(f"frozen reference: weights missing for {res.missing_keys[:4]}")
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.eval()
        return t.forward_pipeline(ref) if self.pipelined else ref

    def run_optim(self, item: TrainItem | None) -> None:
        """Reduce, clip and apply the accumulated gradients (Trainer.apply_gradients: TP/DP reductions,
        global norm, clip, ZeRO-1 AdamW, bias update, step + 1); bump the weight version on every rank."""
        t, tr = self.trainer, self.trainer.config["train"]
        t0 = time.perf_counter()
        self.current = item
        if self.pending_rl > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(self.pending_rl)
        job = item is None or item.source == "job"
        upd = t.apply_gradients(min_lr=None if job else tr["lr"])  # train ops: constant lr after warmup
        norm, lr = upd["grad_norm"], upd["lr"]
        for p in self.model.parameters():
            p.grad = None
        self.pending_rl = self.pending_micro = 0
        if item is not None and item.source == "job":
            self.job_steps_done += 1
            self.job_cursor += 1
        version = self.weights.bump() if self.weights is not None else t.step
        self.last.update(step=t.step, grad_norm=norm, lr=lr, weight_version=version)
        save_error = self._record(job, norm, lr, version, time.perf_counter() - t0) if self.record else None
        self.current = None
        if item is not None and item.on_done is not None:
            result = self._result(item.result)
            if save_error is not None:
                result["save_error"] = save_error
            item.on_done(result)

    def _record(self, job: bool, norm: float, lr: float, version: int, optim_s: float) -> str | None:
        """metrics.jsonl line (rank 0) and checkpoint (every rank) after an optimizer step. Collective. The
        update is applied already: a write that fails is reported (the message returned), not raised."""
        t, a = self.trainer, self._acc
        loss = t.mean_over_dp({"ce": a["loss"] / max(1, a["n"])})["ce"]  # the mean over dp shares
        dt = a["time"] + optim_s
        tokens = a["tokens"] * (getattr(t, "dp", 1) if job else 1)  # job: per-dp shares; ops: whole batch
        self._acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
        errors = []
        if self.metrics_file is not None:
            try:
                self.metrics_file.write({"step": t.step, "loss": loss, "lr": lr, "grad_norm": norm,
                                         "tokens_per_s": tokens / dt if dt > 0 else 0.0, "time_s": dt,
                                         "source": "job" if job else "train_op", "weight_version": version})
            except OSError as e:  # rank 0 alone writes it: nothing collective to agree on
                self.save_failures += 1
                errors.append(f"metrics.jsonl line for step {t.step} not written ({type(e).__name__}: {e})")
        every = t.config["train"]["save_every"]
        if every and t.step % every == 0:
            saved = self.save()
            if "error" in saved:  # raised, and so caught, on every rank alike
                errors.append(saved["error"])
        if not errors:
            return None
        message = "; ".join(errors)
        t.log(f"warning: {message}; the update of step {t.step} is applied and training goes on")
        return message

    # --- checkpoints ----------------------------------------------------------------------------------
    def request_save(self, on_done: Callable[[dict], None]) -> None:
        """Driver: a `save` op; the scheduler runs the save as its next step, `on_done(result)` after."""
        self.saves.append(on_done)

    def unsaved(self) -> bool:
        """Whether an optimizer step was applied since the newest checkpoint."""
        return self.trainer.step != self.saved_step

    def save(self) -> dict:
        """Checkpoint the weights as they are now (collective: every rank, as a scheduler step), with the
        weight version in its manifest, so a server resumed from it goes on counting from there. Answers
        the waiting `save` ops. Accumulated gradients of ops without an optimizer step are not saved. A
        checkpoint that cannot be written (a full disk) fails alike on every rank: the result is then
        `{"error": ...}` (also the `save` ops' answer) and serving and training go on."""
        from runtime.train.checkpoint import CheckpointSaveError

        version = self.weights.version if self.weights is not None else self.trainer.step
        try:
            path = self.trainer.save(extra={"weight_version": version})
        except CheckpointSaveError as e:
            self.save_failures += 1
            result = {"error": str(e)}
        else:
            self.saved_step = self.trainer.step
            result = {"path": path, "step": self.trainer.step, "weight_version": version}
        saves, self.saves = self.saves, []
        for on_done in saves:
            on_done(result)
        return result

    def _result(self, r: dict) -> dict:
        v = self.weights.version if self.weights is not None else self.trainer.step
        return {"step": self.trainer.step, "loss": r.get("loss", 0.0), "weight_version": v,
                "tokens": r.get("tokens", 0), **{k: r[k] for k in ("clip_frac", "kl") if k in r}}

    def summary(self) -> dict[str, float]:
        dt = max(1e-9, time.perf_counter() - self._t0)
        out = {"optimizer_steps": self.trainer.step, "job_steps": self.job_steps_done,
               "tokens_total": self.tokens_total, "queue": len(self.queue), "save_failures": self.save_failures,
               "steps_per_s": round(self.trainer.step / dt, 4)}
        if "loss" in self.last:
            out["loss"] = self.last["loss"]
        return out
