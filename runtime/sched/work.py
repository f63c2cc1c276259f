"""Training as schedulable steps on the serving model: `TrainWork` wraps a `runtime.train.Trainer` (through
its public API: batch, microbatch_slices, forward_backward, pipeline_step, apply_gradients, mean_over_dp,
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
averaged (each op's loss is a token mean over its own loss mask). Under pipeline parallelism a job step
is one item (the executor runs all its micro-batches) and `train` ops support the "ce" loss only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ops import IGNORE_INDEX
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
        b = self.batch
        return (1, b.input_ids.shape[0], b.input_ids.shape[1], LOSS_CODES[b.loss],
                int(b.advantages is not None), int(b.old_logprobs is not None), int(b.kl_coef > 0))


class TrainWork:
    """The training side of the shared scheduler, on every rank (the driver fills the queue)."""

    def __init__(self, trainer, job_steps: int = 0, clip_eps: float = 0.2, reference: bool = False,
                 record: bool = False) -> None:
        self.pipelined = trainer.pipelined
        if self.pipelined and trainer.schedule.num_stages != trainer.pp:
            raise NotImplementedError(
                f"serve + train under parallel.pp > 1 needs a schedule with one stage per pipeline rank "
                f"(1f1b, zb1p, gpipe), not {trainer.schedule.kind!r}: serving runs the layers this rank trains")
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
        micro = TrainItem(Kind.TRAIN_MICRO, "rl", batch=batch, on_done=None if optimizer_step else on_done)
        self.queue.append(micro)
        if optimizer_step:
            self.queue.append(TrainItem(Kind.OPTIM, "rl", on_done=on_done, result=micro.result))

    def _fill_from_job(self) -> None:
        if self.queue or self.job_left <= 0 or self.pending_micro or self._bwd is not None:
            return
        t = self.trainer
        inputs, _ = t.batch(self.job_cursor)
        n = 1 if self.pipelined else len(t.microbatch_slices(inputs.shape[0]))  # pipelined: one executor step
        for i in range(n):
            self.queue.append(TrainItem(Kind.TRAIN_MICRO, "job", step=self.job_cursor, micro=i, micros=n))
        self.queue.append(TrainItem(Kind.OPTIM, "job", step=self.job_cursor))
        self.job_left -= 1

    def next_kind(self) -> Kind | None:
        if self.pending_backward():
            return Kind.TRAIN_BWD
        self._fill_from_job()
        return self.queue[0].kind if self.queue else None

    def peek(self) -> TrainItem:
        return self.queue[0]

    def pop(self) -> TrainItem:
        return self.queue.popleft()

    def has_work(self) -> bool:
        return self.next_kind() is not None

    def fail_all(self, message: str) -> None:
        """After a failed step: drop the accumulated gradients and answer every queued op with an error."""
        items = ([self.current] if self.current is not None else []) + list(self.queue)
        self.current, self._bwd = None, None
        for item in items:
            if item.on_done is not None:
                item.on_done({"error": message})
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
        if item.source != "rl":
            return  # job batches: every rank reads its own data share
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
        rows, cols, loss, has_adv, has_old, has_kl = head[1:7]
        ids = bcast(torch.zeros(rows, cols, dtype=torch.int64, device="cpu"))
        mask = bcast(torch.zeros(rows, cols, dtype=torch.float32, device="cpu"))
        adv = bcast(torch.zeros(rows, dtype=torch.float32, device="cpu")) if has_adv else None
        old = bcast(torch.zeros(rows, cols, dtype=torch.float32, device="cpu")) if has_old else None
        kl = float(bcast(torch.zeros(1, dtype=torch.float64, device="cpu"))[0]) if has_kl else 0.0
        name = {v: k for k, v in LOSS_CODES.items()}[loss]
        return TrainItem(Kind.TRAIN_MICRO, "rl", batch=RLBatch(ids, mask, adv, old, name, kl))

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
        if item.source == "job":
            inputs, labels = t.batch(item.step)
            if self.pipelined:  # the whole step's micro-batches through the pipeline schedule
                ce = t.forward_backward(inputs, labels, t.microbatch_slices(inputs.shape[0]))["ce"]
                tokens = int(labels.numel())
            else:
                sl = t.microbatch_slices(inputs.shape[0])[item.micro]
                out, parts = self.model(inputs[sl], labels[sl])
                loss = out / item.micros
                ce, tokens = float(parts["ce"].detach()), int(labels[sl].numel())
        elif self.pipelined:
            ce, tokens = self._pipelined_ce(item.batch)
            self.pending_rl += 1
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

    def _pipelined_ce(self, batch: RLBatch) -> tuple[float, int]:
        """A `ce` op through the pipeline executor: labels are the next tokens where the mask selects them
        (IGNORE_INDEX elsewhere); rows are padded with ignored rows to the schedule's micro-batch count. The
        executor's loss is the token mean over the whole batch, the same as `masked_ce`."""
        if batch.loss != "ce":
            raise ValueError("under parallel.pp > 1 only loss 'ce' is supported (the pipeline executor computes "
                             "the cross-entropy on the last stage)")
        t = self.trainer
        ids, mask = batch.input_ids.to(t.device), batch.loss_mask.to(t.device)
        labels = torch.where(mask[:, 1:] > 0, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        labels = torch.cat([labels, torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        m = t.microbatches
        pad = -ids.shape[0] % m
        if pad:
            ids = torch.cat([ids, torch.zeros(pad, ids.shape[1], dtype=ids.dtype, device=ids.device)])
            labels = torch.cat([labels, torch.full((pad, ids.shape[1]), IGNORE_INDEX, dtype=labels.dtype,
                                                   device=ids.device)])
        per = ids.shape[0] // m
        loss = t.pipeline_step([(ids[i * per:(i + 1) * per], labels[i * per:(i + 1) * per]) for i in range(m)])
        return loss, batch.tokens

    def supports(self, loss: str, kl_coef: float = 0.0) -> str | None:
        """Why a `train` op with this loss cannot run here (None: it can)."""
        if self.pipelined and loss != "ce":
            return (f"loss {loss!r} under parallel.pp > 1 is not supported yet (the pipeline executor "
                    f"computes only the cross-entropy); use loss 'ce' or pp = 1")
        if kl_coef > 0 and self.ref_model is None:
            return "kl_coef > 0 needs a frozen reference: start the server with scheduler.kl_reference = true"
        return None

    def _frozen_copy(self):
        from runtime.model.loading import load_model

        t = self.trainer
        if self.pipelined:
            raise NotImplementedError("scheduler.kl_reference under parallel.pp > 1 is not supported yet")
        ref = load_model(t.config["model"]["path"], t.mesh, dtype=t.dtype, device=str(t.device),
                         seed=t.config["train"]["seed"], mtp=False,
                         max_nodes_per_token=t.config["parallel"]["max_nodes_per_token"])
        res = ref.load_state_dict(self.model.state_dict(), strict=False)  # the weights as they are now
        if res.missing_keys:
            raise RuntimeError(f"frozen reference: weights missing for {res.missing_keys[:4]}")
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref.eval()

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
        if self.record:
            self._record(job, norm, lr, version, time.perf_counter() - t0)
        self.current = None
        if item is not None and item.on_done is not None:
            item.on_done(self._result(item.result))

    def _record(self, job: bool, norm: float, lr: float, version: int, optim_s: float) -> None:
        """metrics.jsonl line (rank 0) and checkpoint (every rank) after an optimizer step. Collective."""
        t, a = self.trainer, self._acc
        loss = t.mean_over_dp({"ce": a["loss"] / max(1, a["n"])})["ce"]  # the mean over dp shares
        dt = a["time"] + optim_s
        tokens = a["tokens"] * (getattr(t, "dp", 1) if job else 1)  # job: per-dp shares; ops: whole batch
        self._acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
        if self.metrics_file is not None:
            self.metrics_file.write({"step": t.step, "loss": loss, "lr": lr, "grad_norm": norm,
                                     "tokens_per_s": tokens / dt if dt > 0 else 0.0, "time_s": dt,
                                     "source": "job" if job else "train_op", "weight_version": version})
        every = t.config["train"]["save_every"]
        if every and t.step % every == 0:
            t.save()

    def _result(self, r: dict) -> dict:
        v = self.weights.version if self.weights is not None else self.trainer.step
        return {"step": self.trainer.step, "loss": r.get("loss", 0.0), "weight_version": v,
                "tokens": r.get("tokens", 0), **{k: r[k] for k in ("clip_frac", "kl") if k in r}}

    def summary(self) -> dict[str, float]:
        dt = max(1e-9, time.perf_counter() - self._t0)
        out = {"optimizer_steps": self.trainer.step, "job_steps": self.job_steps_done,
               "tokens_total": self.tokens_total, "queue": len(self.queue),
               "steps_per_s": round(self.trainer.step / dt, 4)}
        if "loss" in self.last:
            out["loss"] = self.last["loss"]
        return out
