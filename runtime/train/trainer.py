"""The step-level trainer: `Trainer(config, mesh).train_step(batch) -> metrics`, and `fit()` for a whole run.

One optimizer step: forward/backward over this rank's micro-batches (gradients of the step's mean token
loss), TP partial-gradient and data-parallel reductions (parallel.shard), a global gradient norm that
counts every parameter once across tp/pp/ep/dp, clipping, the ZeRO-1 AdamW update, and the aux-loss-free
bias update (parallel.balance) from the step's expert loads. Every layout computes the same numbers up to
float reassociation; the parity tests hold it to that.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.balance import ExpertBalancer
from parallel.link import EmulatedLink
from parallel.shard import all_reduce_data_parallel_grads, all_reduce_partial_grads, shard_marks
from runtime.model.loading import load_model
from runtime.train import checkpoint as ckpt
from runtime.train.data import TokenData
from runtime.train.metrics import MetricsFile, peak_memory_bytes, print_summary, progress_line
from runtime.train.optim import ZeroAdamW, clip_coefficient, global_grad_norm, lr_at

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _group(mesh, dim: str):
    return mesh.group(dim) if mesh is not None and mesh.size(dim) > 1 else None


def _coord(mesh, dim: str) -> int:
    return mesh.coord(dim) if mesh is not None else 0


def _size(mesh, dim: str) -> int:
    return mesh.size(dim) if mesh is not None else 1


class Trainer:
    """Owns this rank's model shard, optimizer, balancer and data view. `mesh=None` is a single process."""

    def __init__(self, config: dict, mesh=None, resume_from: str | None = None,
                 log=None) -> None:
        self.config, self.mesh = config, mesh
        tr, data, par = config["train"], config["data"], config["parallel"]
        self.rank = mesh.rank if mesh is not None else 0
        self.log = log or (lambda msg: print(msg, flush=True) if self.rank == 0 else None)
        self.device = mesh.device if mesh is not None else torch.device("cpu")
        self.dtype = DTYPES[config["model"]["dtype"]]
        torch.manual_seed(tr["seed"])
        self.tp_group, self.ep_group = _group(mesh, "tp"), _group(mesh, "ep")
        self.dp_group, self.edp_group = _group(mesh, "dp"), _group(mesh, "edp")
        self.world_group = _group(mesh, "world")
        self.dp, self.dp_rank = _size(mesh, "dp"), _coord(mesh, "dp")

        self.resume_from = resume_from
        self.pp = _size(mesh, "pp")
        self.microbatches = max(1, par["microbatches"])
        # cheap checks first: a bad data path or batch split fails before the model is built
        self.data = TokenData(data["path"], data["seq_len"], tr["global_batch"], data["shuffle"], tr["seed"])
        if tr["global_batch"] % self.dp:
            raise ValueError(f"train.global_batch = {tr['global_batch']} must be divisible by dp = {self.dp}")
        if self.pp > 1 and (tr["global_batch"] // self.dp) % self.microbatches:
            raise ValueError(f"pipeline: train.global_batch / dp = {tr['global_batch'] // self.dp} sequences "
                             f"do not split into parallel.microbatches = {self.microbatches} equal micro-batches")
        mtp = tr["mtp_loss_coef"] > 0  # under pp the MTP modules sit on the last stage (the executor)
        path = resume_from or config["model"]["path"]
        # This rank's part of the model (an HF dir, a training checkpoint or builtin:NAME): its pipeline
        # stages (both under DualPipe(V)), its TP slices, its experts; nothing else is built.
        self.model = load_model(path, mesh, dtype=self.dtype, device=str(self.device), seed=tr["seed"], mtp=mtp,
                                schedule=par["schedule"], max_nodes_per_token=par["max_nodes_per_token"],
                                link=EmulatedLink.from_config(par["emulate_link"]))
        if tr.get("fp8"):
            from ops.fp8_train import convert_to_fp8_training

            convert_to_fp8_training(self.model)
        self.model.mtp_loss_coef = tr["mtp_loss_coef"]
        self.gates = [m for m in self.model.modules() if hasattr(m, "e_score_correction_bias")
                      and hasattr(m, "aux_loss_coef")]  # routers (runtime.model.deepseek.Gate)
        for g in self.gates:
            g.aux_loss_coef = tr["aux_loss_coef"]
        self.marks = shard_marks(self.model)
        self.stages, self.executor, self._chunk0, self.slices = {}, None, set(), []
        if self.pp > 1:
            self._build_pipeline(par)
        self.gates = [g for g in self.gates if self._holds_module(g)]
        self.optimizer = ZeroAdamW(
            self.named_parameters(), lr=tr["lr"], betas=tr["betas"], eps=tr["eps"],
            weight_decay=tr["weight_decay"], dp_group=self.dp_group, edp_group=self.edp_group,
            expert=lambda n: self.marks.get(n, {}).get("ep_offset") is not None,
        )
        biased = [g for g in self.gates if g.e_score_correction_bias is not None]
        self.balancer = (ExpertBalancer([g.e_score_correction_bias for g in biased], tr["bias_update_rate"],
                                        self.dp_group) if biased else None)
        layer_of = {id(g): i for i, g in enumerate(biased)}
        for g in self.gates:
            g.register_forward_hook(self._gate_hook(layer_of.get(id(g))))
        self.step = 0
        self.resume_manifest: dict[str, Any] = {}  # the manifest of the checkpoint this run resumed from
        if resume_from is not None:
            self._load_state(resume_from)

    # --- what this rank holds -------------------------------------------------------------------------
    def _build_pipeline(self, par: dict) -> None:
        from parallel.pipeline import build
        from parallel.pipeline.executor import PipelineExecutor
        from parallel.pipeline.stages import build_stages
        from parallel.pipeline.validate import slices

        self.schedule = build(par["schedule"], self.pp, self.microbatches)
        self.stages = build_stages(self.model, self.schedule, self.mesh.coord("pp"))
        self._chunk0 = {n for n, _ in self.stages[0].full_named_parameters()}
        self.executor = PipelineExecutor(self.stages, self.schedule, self.mesh)
        self.slices = slices(self.executor.schedule)  # consistent cuts, for stepping in slices

    def _holds_module(self, module: nn.Module) -> bool:
        if not self.stages:
            return True
        return any(module is m for s in self.stages.values() for m in s.modules())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under their whole-model names (the pipeline stages it holds)."""
        if not self.stages:
            return list(self.model.named_parameters())
        held = {id(p) for s in self.stages.values() for p in s.parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in held]

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        if not self.stages:
            return list(self.model.named_buffers())
        held = {id(b) for s in self.stages.values() for b in s.buffers()}
        return [(n, b) for n, b in self.model.named_buffers() if id(b) in held]

    # --- one step --------------------------------------------------------------------------------------
    def _gate_hook(self, layer: int | None):
        """Counts the gate's expert loads for the bias update (layer = its index among biased gates)."""
        def hook(module, args, output):
            if not module.training:
                return
            if layer is not None and self.balancer is not None:
                self.balancer.record_counts(layer, module.last_load)  # the gate's own count of this forward

        return hook

    def _counted(self, name: str) -> bool:
        """Whether this rank's copy of `name` enters the global gradient norm (each parameter once)."""
        info = self.marks.get(name, {})
        if self.stages and self.schedule.kind == "dualpipe" and not self._in_chunk0(name):
            return False  # DualPipe holds every stage twice; count the copy that is chunk 0 somewhere
        if info.get("ep_offset") is not None:
            return _coord(self.mesh, "edp") == 0
        return self.dp_rank == 0 and (info.get("tp_dim") is not None or _coord(self.mesh, "tp") == 0)

    def _in_chunk0(self, name: str) -> bool:
        return name in self._chunk0

    def microbatch_slices(self, n: int) -> list[slice]:
        """How `n` sequences of this rank's share split into micro-batches (equal ones under pp)."""
        m = self.microbatches
        if self.pp > 1 and n % m:
            raise ValueError(f"the pipeline needs train.global_batch / dp = {n} sequences to split into "
                             f"parallel.microbatches = {m} equal micro-batches")
        while n % m:
            m -= 1
        per = n // m
        return [slice(i * per, (i + 1) * per) for i in range(m)]

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on this data-parallel rank's share `(inputs, labels)` [B/dp, T]."""
        t0 = time.perf_counter()
        inputs, labels = (x.to(self.device) for x in batch)
        vocab = self.model.config.vocab_size
        if inputs.numel() and (int(inputs.min()) < 0 or int(torch.maximum(inputs.max(), labels.max())) >= vocab):
            raise ValueError(f"data.path {self.data.path!r}: token ids out of range [0, {vocab}) for this model "
                             f"(step {self.step + 1}: min {int(inputs.min())}, max {int(labels.max())})")
        self.model.train()
        for p in self.model.parameters():
            p.grad = None
        chunks = self.microbatch_slices(inputs.shape[0])
        parts_sum = self.forward_backward(inputs, labels, chunks)
        upd = self.apply_gradients()
        norm, lr, loads = upd["grad_norm"], upd["lr"], upd["loads"]
        losses = self.mean_over_dp(parts_sum)
        dt = time.perf_counter() - t0
        tokens = self.data.global_batch * self.data.seq_len
        m: dict[str, Any] = {"step": self.step, "loss": losses.pop("ce"), "lr": lr, "grad_norm": norm,
                             "tokens_per_s": tokens / dt, "time_s": dt}
        m.update(losses)
        if loads is not None:
            m["expert_load_max_mean"] = float(ExpertBalancer.imbalance(loads).mean())
        return m

    def apply_gradients(self, min_lr: float | None = None) -> dict[str, Any]:
        """The second half of a step, for callers that produced the gradients themselves (e.g. co-training):
        TP/DP reductions, the global norm, clipping, the ZeRO-1 AdamW update at this step's learning rate
        (`min_lr` overrides train.min_lr), the bias update, `step += 1`. Collective. Returns grad_norm, lr
        and the step's reduced expert loads (or None)."""
        tr = self.config["train"]
        named = self.named_parameters()
        for _, p in named:  # every held parameter takes part in the reductions, used or not
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_partial_grads(self.model, self.tp_group)
        all_reduce_data_parallel_grads(self.model, self.dp_group, self.edp_group)
        norm = global_grad_norm((p.grad for n, p in named if self._counted(n)), self.world_group, self.device)
        lr = lr_at(self.step, tr["lr"], tr["min_lr"] if min_lr is None else min_lr, tr["warmup_steps"],
                   tr["steps"])
        self.optimizer.step(lr, clip_coefficient(norm, tr["grad_clip"]))
        if self.balancer is not None and self.stages and self.schedule.kind == "dualpipe":
            self._add_mirror_loads()
        loads = self.balancer.step() if self.balancer is not None else None
        self.step += 1
        return {"grad_norm": norm, "lr": lr, "loads": loads}

    def _add_mirror_loads(self) -> None:
        """DualPipe: pipeline ranks r and P-1-r hold the same stages (as chunks 0/1 and 1/0), so the same
        gates in the same model order, but each routes different micro-batches. Add the mirror's loads to
        ours, so both copies of every gate see the step's whole load and move their biases alike."""
        mine = self.balancer.pending_loads().to(self.device)
        theirs = torch.empty_like(mine)
        peer = self.mesh.ranks("pp")[self.pp - 1 - self.mesh.coord("pp")]
        group = self.mesh.group("pp")
        ops = [dist.P2POp(dist.isend, mine, peer, group), dist.P2POp(dist.irecv, theirs, peer, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for layer, counts in enumerate(theirs):
            self.balancer.record_counts(layer, counts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's share (inputs, labels) of optimizer step `step`'s data, on its device."""
        inputs, labels = self.data.batch(step, self.dp_rank, self.dp)
        return inputs.to(self.device), labels.to(self.device)

    @property
    def pipelined(self) -> bool:
        return self.executor is not None

    @property
    def slice_count(self) -> int:
        """How many slices a pipelined step runs in (the shared scheduler serves between them)."""
        return len(self.slices)

    def forward_pipeline(self, model: nn.Module):
        """A forward-only executor of this job's schedule over another model's stages on this rank (a frozen
        reference): same stage placement, so its last stage is where the training loss is computed."""
        from parallel.pipeline import forward_only
        from parallel.pipeline.executor import PipelineExecutor
        from parallel.pipeline.stages import build_stages

        sched = forward_only(self.schedule)
        return PipelineExecutor(build_stages(model, sched, self.mesh.coord("pp")), sched, self.mesh)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor,
                         chunks: list[slice]) -> dict[str, float]:
        """Gradients of this rank's share of the step loss; returns the loss parts (ce, mtp, aux) averaged
        over its micro-batches."""
        if self.executor is None:
            parts_sum: dict[str, torch.Tensor] = {}  # device tensors, read on the host once at the end
            for sl in chunks:
                loss, parts = self.model(inputs[sl], labels[sl])
                (loss / len(chunks)).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().double() / len(chunks)
            keys = sorted(parts_sum)
            return dict(zip(keys, torch.stack([parts_sum[k] for k in keys]).tolist()))
        tr = self.config["train"]
        mtp_coef = tr["mtp_loss_coef"] if self.model.mtp_depth else 0.0  # every pp rank: the same
        self.executor.run_step([(inputs[sl], labels[sl]) for sl in chunks], mtp_coef=mtp_coef)
        return self.pipeline_parts()

    def pipeline_parts(self) -> dict[str, float]:
        """The last pipelined step's loss parts as `forward_backward` reports them: ce, and mtp (unscaled, as
        the model's forward gives it) and aux when they are on."""
        tr, parts = self.config["train"], self.executor.last_parts
        out = {"ce": parts["ce"]}
        if self.model.mtp_depth and tr["mtp_loss_coef"] > 0:
            out["mtp"] = parts["mtp"] / tr["mtp_loss_coef"]
        if tr["aux_loss_coef"] > 0:
            out["aux"] = parts["aux"]
        return out

    def mean_over_dp(self, parts: dict[str, float]) -> dict[str, float]:
        """Loss parts averaged over the data-parallel ranks (collective over dp)."""
        keys = sorted(parts)
        if self.dp_group is None:
            return dict(parts)
        t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return {k: float(v) / self.dp for k, v in zip(keys, t.tolist())}

    # --- checkpoints -----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        m = self.mesh
        layout = {d: _size(m, d) for d in ("pp", "dp", "tp", "ep")}
        layout["world"] = m.world_size if m is not None else 1
        layout["schedule"] = self.config["parallel"]["schedule"]
        d = self.data
        return {
            "optimizer_steps": self.optimizer.steps,
            "layout": layout,
            "data": {"path": d.path, "seq_len": d.seq_len, "global_batch": d.global_batch,
                     "shuffle": d.shuffle, "seed": d.seed, "next_step": self.step,
                     "windows_consumed": self.step * d.global_batch},
            "rng": ckpt.rng_state(),
            "config_hash": ckpt.config_hash(self.config),
            "config": self.config,
            "model_dtype": self.config["model"]["dtype"],
        }

    def save(self, extra: dict[str, Any] | None = None) -> str:
        """Write `<train.out>/ckpt/step-N` (collective); `extra` goes into its manifest (e.g. a server's
        weight version, as `serving`), and comes back as `resume_manifest` when a run resumes from it."""
        state = self.optimizer.full_state()
        manifest = self.manifest() | ({"serving": extra} if extra else {})
        return ckpt.save_checkpoint(
            self.config["train"]["out"], self.step, params=self.named_parameters(),
            buffers=self.named_buffers(), marks=self.marks, optim_state=state,
            model_config=self.model.config, manifest=manifest, mesh=self.mesh,
            tokenizer_source=self.resume_from or self.config["model"]["path"])

    def _load_state(self, path: str) -> None:
        manifest = ckpt.read_manifest(path)
        if manifest["config_hash"] != ckpt.config_hash(self.config):
            self.log(f"warning: {path} was written with a different model/data/train config "
                     f"(hash {manifest['config_hash']} != {ckpt.config_hash(self.config)}); continuing")
        shapes = {n: p.shape for n, p in self.named_parameters()}
        reader = ckpt.OptimizerStateReader(path, self.marks, shapes)
        self.optimizer.load_state(lambda n, k: reader(n, k).to(self.device), manifest["optimizer_steps"])
        self.step = int(manifest["data"]["next_step"])
        self.resume_manifest = manifest
        ckpt.set_rng_state(manifest.get("rng", {}))
        was = manifest["layout"]
        self.log(f"resumed from {path} at step {self.step} (written at pp={was['pp']} dp={was['dp']} "
                 f"tp={was['tp']} ep={was['ep']})")

    # --- a whole run -----------------------------------------------------------------------------------
    def fit(self, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train to train.steps. `stop()` (collective when it is runtime.stopping's `agreed`) is asked after
        every step: when it says so, the run ends there and saves a checkpoint unless the last step is
        already in one. The summary says whether it `stopped` and names the newest `checkpoint`."""
        tr = self.config["train"]
        total, out = tr["steps"], tr["out"]
        metrics = MetricsFile(out, self.step) if self.rank == 0 else None
        first_step, t_start, n_done = self.step + 1, time.perf_counter(), 0
        first_loss = last_loss = float("nan")
        die_after = os.environ.get("MOERUN_TEST_EXIT_AFTER_STEP")
        tick = getattr(self.mesh, "tick", None) or (lambda: None)  # the watchdog's progress counter
        saved_step, checkpoint, stopped = self.step, self.resume_from, False
        while self.step < total:
            tick()
            m = self.train_step(self.batch(self.step))
            n_done += 1
            last_loss = m["loss"]
            if n_done == 1:
                first_loss = m["loss"]
            if metrics is not None:
                metrics.write(m)
                elapsed = time.perf_counter() - t_start
                self.log(progress_line(m, total, elapsed / n_done * (total - self.step)))
            if tr["save_every"] and (self.step % tr["save_every"] == 0 or self.step == total):
                checkpoint, saved_step = self.save(), self.step
                self.log(f"saved checkpoint {checkpoint}")
            if die_after is not None and self.step == int(die_after):
                sys.stdout.flush()
                os._exit(19)  # test hook: a kill right after this step (and its checkpoint, if any)
            if stop is not None and self.step < total and stop():
                stopped = True
                break
        if stopped and self.step != saved_step:  # nothing applied is lost
            checkpoint = self.save()
            self.log(f"saved checkpoint {checkpoint}")
        elapsed = time.perf_counter() - t_start
        tokens = n_done * self.data.global_batch * self.data.seq_len
        summary = {"steps": n_done, "first_step": first_step, "last_step": self.step, "tokens": tokens,
                   "time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                   "first_loss": first_loss, "last_loss": last_loss,
                   "peak_memory_bytes": peak_memory_bytes(self.device), "stopped": stopped,
                   "checkpoint": checkpoint}
        if self.rank == 0 and n_done:
            print_summary(summary)
        return summary


def resume_path(config: dict) -> str | None:
    """The checkpoint a run with this config continues from (None: a fresh start)."""
    if not config["train"]["resume"]:
        return None
    return ckpt.latest_checkpoint(config["train"]["out"])
