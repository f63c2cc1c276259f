"""The pipeline executor: runs a schedule's action lists on real stages.

    stages = build_stages(model, schedule, mesh.coord("pp"))          # {chunk: PipelineStage}
    ex = PipelineExecutor(stages, schedule, mesh)
    loss = ex.run_step([(input_ids, labels), ...])                   # one (ids, labels) per micro-batch
    # gradients are now accumulated in the stage modules' .grad; loss (a 0-dim tensor) on every pp rank
    logits = PipelineExecutor(stages, forward_only(schedule), mesh).run_forward([ids, ...])  # inference

Every pipeline rank walks its program: `lower(schedule)` (lower.py) turns the builder's SEND / RECV into
POST / WAIT actions in lock-step order, so the program cannot deadlock under NCCL's p2p semantics (the
constructor validates it; pass an already lowered schedule to run that one instead).
- POST: one group of sends and receives through `cluster.p2p` (batch_isend_irecv, or the NCCL emulation
  with MOERUN_P2P=nccl-emulated): a send takes the tensor its compute left in the outbox; a receive gets a
  fresh buffer of the activation shape [B, T, H]. Receives are posted early (prefetched).
- WAIT: waits for those ops; a received tensor goes to the inbox of the compute that consumes it, which
  comes right after. The step ends with a WAIT for every send.
- F / B / I / W / FB on the local chunk, phase by phase (parallel/pipeline/overlap.py). FB runs its forward
  and backward interleaved so that each one's all-to-all is in flight while the other computes.
- Where consecutive stages sit on one rank (DualPipeV's turn) the activation / gradient is handed over
  locally, no message.

Loss: the step's loss is the mean token cross-entropy over all tokens of all micro-batches (labels -100
ignored), plus the mean over micro-batches of the gates' auxiliary losses when they are on. Micro-batch m's
loss term is sum(CE_m) / total_tokens + aux_m / M, so gradients equal those of the whole batch in one piece
whatever the micro-batch split. After the step every pipeline rank has `last_losses[m]` (each term, summed
over the stages by one all-reduce over pp) and `run_step` returns their sum.

Devices: the buffers the executor makes itself (RECV buffers, the per-micro-batch loss vector that is
all-reduced over pp, the forward-only logits and their shape broadcast) are created on the device of this
rank's stage parameters, so the same code runs with CPU stages over gloo and CUDA stages over NCCL; the
micro-batches must be on that device too.

`busy_s` is the wall time of the last step's compute actions (F, B, I, W, FB, including the all-to-alls
inside them): a rank's busy time, as the simulator counts it.

Gradients accumulate into `.grad` (call `zero_grad` between steps yourself). For DualPipe the two copies
of every stage are summed at the end of the step, so both hold the full gradient.

p2p ordering: messages between two ranks are matched in posting order (NCCL has no tags; gloo tag 0
likewise) and activations and gradients have the same shape, so a mis-ordered pair would be silent. The
builders order every rank's RECVs from a peer as that peer's SENDs, the lowering keeps that order, the
validator checks it, and the executor posts exactly in program order (the NCCL emulation also checks
each message's name at run time). See docs/pipeline.md, "p2p under NCCL".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from cluster import p2p
from ops import IGNORE_INDEX

from .lower import lower
from .overlap import run, run_pair, stage_backward, stage_forward, stage_weight_backward
from .schedule import ACT, BI, FB, GRAD, POST, SEND, WAIT, Action, B, F, Schedule, ScheduleError, W
from .stages import PipelineStage, sum_mirrored_grads
from .validate import validate


class PipelineExecutor:
    """Runs one training step of `schedule` on this rank's stages. See the module docstring.

    `mesh` is a cluster Mesh (its "pp" group is used), or pass `pp_group` / `pp_ranks` / `pp_rank` directly.
    `schedule` is a builder's schedule (lowered here, lock-step) or an already lowered one; check=False
    skips validating a lowered one (tests use it to run a program that deadlocks on NCCL).
    """

    def __init__(self, stages: dict[int, PipelineStage], schedule: Schedule, mesh=None, *, pp_group=None,
                 pp_ranks: list[int] | None = None, pp_rank: int | None = None, check: bool = True) -> None:
        if mesh is not None:
            pp_group, pp_ranks, pp_rank = mesh.group("pp"), mesh.ranks("pp"), mesh.coord("pp")
        if pp_ranks is None or pp_rank is None:
            raise ValueError("PipelineExecutor needs a mesh, or pp_group, pp_ranks and pp_rank")
        if len(pp_ranks) != schedule.pp:
            raise ScheduleError(f"schedule is for pp={schedule.pp} ranks but the pp group has {len(pp_ranks)}")
        held = schedule.stages_of(pp_rank)
        got = {c: s.stage for c, s in stages.items()}
        if got != held:
            raise ScheduleError(f"pp rank {pp_rank} must hold stages {held} (chunk: stage) under "
                                f"{schedule.kind}, got {got}")
        if not schedule.lowered:
            schedule = lower(schedule)  # validated there
        elif check:
            validate(schedule)
        self.stages, self.schedule = stages, schedule
        self.pp_group, self.pp_ranks, self.pp_rank = pp_group, pp_ranks, pp_rank
        self.actions = schedule.ranks[pp_rank]
        self.last_losses: dict[int, torch.Tensor] = {}
        self._p2p = None  # made on the first POST: a pp=1 program has none and needs no process group

    # ------------------------------------------------------------------------------------------ helpers
    def _peer(self, a: Action) -> int:
        return self.pp_ranks[a.peer]

    def _post(self, a: Action, act_shape, dtype: torch.dtype, device: torch.device) -> None:
        """POST: one group; sends take their tensor from the outbox, receives get a new buffer of the
        activation shape (`act_shape`: a tuple, or a function of the micro-batch)."""
        ops = []
        for op in a.ops:
            if op.kind == SEND:
                t = self.box.pop((op.what, op.stage, op.mb)).contiguous()
            else:
                shape = act_shape(op.mb) if callable(act_shape) else act_shape
                t = torch.empty(shape, dtype=dtype, device=device)
            ops.append(p2p.Op("send" if op.kind == SEND else "recv", t, self._peer(op),
                              f"{op.what} s{op.stage} mb{op.mb}"))
        if self._p2p is None:
            self._p2p = p2p.channel(self.pp_group)
        for op, work, p in zip(a.ops, self._p2p.post(ops), ops, strict=True):
            self.inflight[op] = (work, p.tensor)

    def _wait(self, a: Action) -> None:
        """WAIT: the named ops are done; received tensors go to the inbox of their consumer."""
        for op in a.ops:
            work, t = self.inflight.pop(op)
            work.wait()
            if op.kind != SEND:
                self.box[(op.what, op.stage, op.mb)] = t

    def _p2p_action(self, a: Action, act_shape, dtype: torch.dtype, device: torch.device) -> bool:
        """Run `a` if it is a POST or WAIT; False for a compute action."""
        if a.kind == POST:
            self._post(a, act_shape, dtype, device)
        elif a.kind == WAIT:
            self._wait(a)
        else:
            return False
        return True

    def _check_drained(self) -> None:
        leftovers = list(self.box) + list(self.tapes) + list(self.deferred) + [str(op) for op in self.inflight]
        if leftovers:
            raise RuntimeError(f"pipeline step ended with unconsumed work on pp rank {self.pp_rank}: "
                               f"{leftovers[:6]}")

    def _forward(self, a_stage: int, mb: int, chunk: int):
        stage = self.stages[chunk]
        ids, labels = self.mbs[mb]
        side = None
        if stage.is_first:
            x = ids
        else:
            x = self.box.pop((ACT, a_stage - 1, mb))
            if self.carry:  # [hidden | the first stage's embeddings, carried to the MTP modules]
                x, side = x.split(x.shape[-1] // 2, dim=-1)
        target = labels if self.loss is None else (lambda logits, mb=mb: self.loss(mb, logits))
        parts: dict = {}
        out, tape = yield from stage_forward(stage, x, target if stage.is_last else None, self.total_tokens,
                                             1.0 / len(self.mbs), side if stage.is_last else None,
                                             self.mtp_scale, parts)
        self.tapes[(a_stage, mb)] = tape
        for node in tape:  # auxiliary (balance) losses of this stage's gates, weighted 1/M
            for aux in getattr(node, "aux", ()):
                self.mb_parts[mb, 2] += aux.detach().double() / len(self.mbs)
        if stage.is_last:
            self.mb_parts[mb, 0] += parts["ce"].double() if "ce" in parts else out.detach().double()
            if "mtp" in parts:
                self.mb_parts[mb, 1] += parts["mtp"].double()
            self.outputs[(a_stage, mb)] = out
            return None
        out = out.detach()
        if self.carry:
            if stage.is_first:  # the embeddings again, with their own graph (MTP's gradient flows back here)
                side = stage.embed_tokens(ids)
                self.sides[mb] = side
            out = torch.cat([out, side.detach()], dim=-1)
        self.box[(ACT, a_stage, mb)] = out
        return None

    def _backward(self, a_stage: int, mb: int, chunk: int, split: bool, fill: bool = False):
        stage = self.stages[chunk]
        g_side = None
        if stage.is_last:
            grad = torch.ones_like(self.outputs.pop((a_stage, mb)))
        else:
            grad = self.box.pop((GRAD, a_stage + 1, mb))
            if self.carry:
                grad, g_side = grad.split(grad.shape[-1] // 2, dim=-1)
        tape = self.tapes[(a_stage, mb)] if split else self.tapes.pop((a_stage, mb))
        g_in, g_last_side = yield from stage_backward(tape, grad, split, fill)
        g_side = g_last_side if stage.is_last else g_side
        if split:
            self.deferred.append((a_stage, mb, chunk))
        if stage.is_first:
            side = self.sides.pop(mb, None)
            if side is not None and g_side is not None:
                side.backward(g_side)  # the MTP modules' gradient of the embeddings
            return None
        if g_in is None:
            raise RuntimeError(f"stage {a_stage} mb {mb}: backward produced no input gradient")
        if self.carry:
            g_in = torch.cat([g_in, g_side if g_side is not None else torch.zeros_like(g_in)], dim=-1)
        self.box[(GRAD, a_stage, mb)] = g_in
        return None

    def _weights(self, a: Action) -> None:
        if not self.deferred or self.deferred[0] != (a.stage, a.mb, a.chunk):
            raise ScheduleError(f"W for stage {a.stage} mb {a.mb} but the oldest deferred weight gradient is "
                                f"{self.deferred[0] if self.deferred else None}")
        self.deferred.popleft()
        stage_weight_backward(self.tapes.pop((a.stage, a.mb)))

    # ------------------------------------------------------------------------------------- forward only
    @torch.no_grad()
    def run_forward_with(self, forward: Callable[[PipelineStage, int, torch.Tensor | None], torch.Tensor],
                         act_shape: Callable[[int], tuple], dtype: torch.dtype, device: torch.device
                         ) -> dict[int, torch.Tensor]:
        """Walk a forward-only program with your own stage forward: `forward(stage, mb, x)` (x None on the
        first stage, the received or handed-over activation elsewhere) returns the activation, or on the
        last stage whatever the caller wants back. `act_shape(mb)` is micro-batch mb's activation shape (the
        receive buffers; it may differ per micro-batch, e.g. a serving step's). Returns {mb: last stage's
        output} for the micro-batches whose last stage runs on this rank. Serving runs its steps this way."""
        if not self.schedule.forward_only:
            raise ScheduleError("run_forward_with needs a forward-only schedule: wrap it with forward_only(...)")
        self.box, self.tapes, self.outputs = {}, {}, {}
        self.deferred, self.inflight = deque(), {}
        for a in self.actions:
            if self._p2p_action(a, act_shape, dtype, device):
                continue
            if a.kind != F:
                raise ScheduleError(f"{a.kind} in a forward-only schedule")
            stage = self.stages[a.chunk]
            out = forward(stage, a.mb, None if stage.is_first else self.box.pop((ACT, a.stage - 1, a.mb)))
            if stage.is_last:
                self.outputs[a.mb] = out
            else:
                self.box[(ACT, a.stage, a.mb)] = out
        self._check_drained()
        outputs, self.outputs = self.outputs, {}
        return outputs

    @torch.no_grad()
    def run_forward(self, input_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits [B, T, V] (fp32) of each micro-batch on every pipeline rank: inference through the pipeline.

        Needs a forward-only schedule (`parallel.pipeline.forward_only(build(...))`); the last stage's rank
        broadcasts each micro-batch's logits over pp."""
        sched = self.schedule
        if len(input_ids) != sched.chunks:
            raise ValueError(f"schedule built for {sched.chunks} micro-batches, got {len(input_ids)}")
        dtype, device = _placement(self.stages, input_ids[0].device)
        act_shape = (*input_ids[0].shape, _hidden_size(self.stages))

        def forward(stage: PipelineStage, mb: int, x: torch.Tensor | None) -> torch.Tensor:
            out, _ = run(stage_forward(stage, input_ids[mb] if x is None else x, None, 1, 1.0 / len(input_ids)))
            return out

        outputs = self.run_forward_with(forward, lambda mb: act_shape, dtype, device)
        last = sched.num_stages - 1
        out = []
        for m in range(sched.chunks):
            src = sched.rank_of(last, m)
            logits = outputs.pop(m) if src == self.pp_rank else None
            if len(self.pp_ranks) > 1:
                shape = torch.tensor(list(logits.shape) if logits is not None else [0, 0, 0], device=device)
                dist.broadcast(shape, self.pp_ranks[src], group=self.pp_group)
                if logits is None:
                    logits = torch.empty(shape.tolist(), dtype=torch.float32, device=device)
                dist.broadcast(logits, self.pp_ranks[src], group=self.pp_group)
            out.append(logits)
        return out

    # ---------------------------------------------------------------------------------------------- step
    def run_step(self, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss=None,
                 mtp_coef: float = 0.0) -> torch.Tensor:
        """Run one step over `microbatches` (every pp rank passes the same list); returns the step loss.
        `loss(mb, logits)` replaces the cross-entropy term of micro-batch mb on its last stage (it returns
        that term, scaled as it should add up over the step); `mtp_coef` > 0 adds the MTP loss (the model's
        last stage has the MTP modules; every rank passes the same coefficient)."""
        self.start_step(microbatches, loss, mtp_coef)
        self.advance()
        return self.finish_step()

    def start_step(self, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss=None,
                   mtp_coef: float = 0.0) -> None:
        """Begin a step that `advance` runs, possibly in slices (other work, e.g. serving steps over other
        groups, may run between them), and `finish_step` ends. Arguments as for `run_step`."""
        sched = self.schedule
        if len(microbatches) != sched.chunks:
            raise ValueError(f"{sched.kind} schedule built for {sched.chunks} micro-batches, got "
                             f"{len(microbatches)}")
        shapes = {tuple(ids.shape) for ids, _ in microbatches}
        if len(shapes) != 1 or any(tuple(lab.shape) != tuple(ids.shape) for ids, lab in microbatches):
            raise ValueError(f"all micro-batches need the same [B, T] shape for inputs and labels, got {shapes}")
        self.dtype, self.device = _placement(self.stages, microbatches[0][0].device)
        self.carry = mtp_coef > 0 and sched.num_stages > 1
        hidden = _hidden_size(self.stages) * (2 if self.carry else 1)
        self.act_shape = (*next(iter(shapes)), hidden)
        self.mbs, self.loss = list(microbatches), loss
        valid = [int((lab != IGNORE_INDEX).sum()) for _, lab in microbatches]
        self.total_tokens = max(1, sum(valid))
        # MTP module k predicts labels[t+k+1]: its term is mtp_coef / depth * sum(CE_k) / its target count
        depth = _mtp_depth(self.stages) if self.carry else 0
        counts = [max(1, sum(int((lab[:, k + 1:] != IGNORE_INDEX).sum()) for _, lab in microbatches))
                  for k in range(depth)]
        self.mtp_scale = [mtp_coef / depth / c for c in counts]
        self.box, self.tapes, self.outputs, self.sides, self.inflight = {}, {}, {}, {}, {}
        self.deferred: deque = deque()
        self.mb_parts = torch.zeros(len(self.mbs), 3, dtype=torch.float64, device=self.device)  # ce, mtp, aux
        self.busy_s = 0.0
        self._pc = 0

    def advance(self, until: int | None = None) -> None:
        """Run this rank's program up to action `until` (None: to its end). Stopping only at consistent
        cuts (`parallel.pipeline.validate.slices`) keeps every rank able to reach its next cut."""
        end = len(self.actions) if until is None else until
        while self._pc < end:
            a = self.actions[self._pc]
            self._pc += 1
            if self._p2p_action(a, self.act_shape, self.dtype, self.device):
                continue
            t0 = time.perf_counter()
            if a.kind == F:
                run(self._forward(a.stage, a.mb, a.chunk))
            elif a.kind in (B, BI):
                run(self._backward(a.stage, a.mb, a.chunk, split=a.kind == BI))
            elif a.kind == W:
                self._weights(a)
            elif a.kind == FB:
                run_pair(self._forward(a.stage, a.mb, a.chunk),
                         self._backward(a.b_stage, a.b_mb, a.b_chunk, split=False, fill=True))
            else:
                raise ScheduleError(f"unknown action kind {a.kind!r}")
            self.busy_s += time.perf_counter() - t0

    def finish_step(self) -> torch.Tensor:
        """End the step (collective over pp): sum DualPipe's mirrored gradients, gather each micro-batch's
        loss terms on every pp rank (`last_losses`, `last_parts` with "ce", "mtp", "aux"); returns the loss."""
        self.advance()
        self._check_drained()
        sum_mirrored_grads(self.stages, self.schedule, self.pp_rank, self.pp_group, self.pp_ranks, self.device)
        if len(self.pp_ranks) > 1:
            dist.all_reduce(self.mb_parts, group=self.pp_group)
        per_mb = self.mb_parts.sum(1)
        self.last_losses = {m: v.float() for m, v in enumerate(per_mb)}
        self.last_parts = dict(zip(("ce", "mtp", "aux"), self.mb_parts.sum(0).tolist()))
        return per_mb.sum().float()


def _mtp_depth(stages: dict[int, PipelineStage]) -> int:
    """How many MTP modules the model has (every rank must agree: the last stage's count, else 1)."""
    for s in stages.values():
        if s.mtp is not None:
            return len(s.mtp)
    return 1


def _placement(stages: dict[int, PipelineStage], fallback: torch.device) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of this rank's stage parameters: the receive buffers' dtype, and the device of every
    buffer the executor makes. A rank whose stages hold no parameters (empty interior stages) falls back to
    float32 on the device of the micro-batch inputs."""
    for s in stages.values():
        for p in s.parameters():
            return p.dtype, p.device
    return torch.float32, fallback


def _hidden_size(stages: dict[int, PipelineStage]) -> int:
    for s in stages.values():
        if s.embed_tokens is not None:
            return s.embed_tokens.weight.shape[1]
        if s.norm is not None:
            return s.norm.weight.shape[0]
        for layer in s.layers.values():
            return layer.input_layernorm.weight.shape[0]
    raise ValueError("cannot tell the hidden size: a stage with no embedding, layers or head")
