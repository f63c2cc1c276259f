"""A pipelined training step for the shared scheduler: run in slices, with any loss, on every schedule.

Under pipeline parallelism one optimizer step's forward and backward is one program of the pipeline schedule
(parallel/pipeline/executor.py). The scheduler runs it in slices (`parallel.pipeline.validate.slices`:
consistent cuts, at most one compute action per rank per slice), so serving steps can run between them:
serving's own pipeline posts its p2p on a second communicator over the same ranks (`mesh.twin("pp")`), and at
a cut no all-to-all is in flight. Every rank runs the same slices; the step ends at its last.

The loss of a step is computed on the last stage: the job's cross-entropy (and MTP) as in `moerun train`, or
a `train` op's: "ce" over the op's loss mask, or "grpo" (clipped policy-gradient, optional KL to a frozen
reference, token mean over the mask) from the same per-token log-probabilities `runtime.sched.rl` uses in
one process. A reference for the KL term runs its own forward-only pipeline first (same schedule, same stage
placement), so its log-probabilities are on the rank where the last stage computes the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ops import IGNORE_INDEX
from runtime.sched.rl import RLBatch, grpo_token_terms

__all__ = ["PipelinedStep", "rl_microbatches"]


def rl_microbatches(batch: RLBatch, chunks: int, device: torch.device) -> tuple[list, int]:
    """A train op's rows as the schedule's micro-batches (rows padded with ignored ones to a multiple of
    `chunks`): [(input_ids, labels)] with labels the next token where the mask selects it (IGNORE_INDEX
    elsewhere); and the rows per micro-batch."""
    ids, mask = batch.input_ids.to(device), batch.loss_mask.to(device)
    labels = torch.where(mask[:, 1:] > 0, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    labels = torch.cat([labels, torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    pad = -ids.shape[0] % chunks
    if pad:
        ids = torch.cat([ids, torch.zeros(pad, ids.shape[1], dtype=ids.dtype, device=device)])
        labels = torch.cat([labels, torch.full((pad, ids.shape[1]), IGNORE_INDEX, dtype=labels.dtype,
                                               device=device)])
    per = ids.shape[0] // chunks
    return [(ids[i * per:(i + 1) * per], labels[i * per:(i + 1) * per]) for i in range(chunks)], per


class PipelinedStep:
    """One step of `trainer`'s pipeline over `microbatches`, run slice by slice (`run_slice(k)`).

    With `batch` (a train op), the last stage's loss is the op's ("ce" through the labels, or "grpo");
    `reference`, when the op has a KL term, is a frozen pipeline (a forward-only PipelineExecutor over the
    reference model's stages) whose log-probabilities are computed before the first slice."""

    def __init__(self, trainer, microbatches: list, batch: RLBatch | None = None, clip_eps: float = 0.2,
                 reference=None) -> None:
        self.trainer, self.ex = trainer, trainer.executor
        self.cuts = trainer.slices
        self.stats = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # clipped tokens, kl sum
        loss = None
        if batch is not None and batch.loss == "grpo":
            loss = self._grpo(batch, microbatches, clip_eps, reference)
        mtp = trainer.config["train"]["mtp_loss_coef"] if batch is None and trainer.model.mtp_depth else 0.0
        self.ex.start_step(microbatches, loss, mtp)
        self.batch = batch

    @property
    def slices(self) -> int:
        return len(self.cuts)

    def run_slice(self, k: int) -> None:
        self.ex.advance(self.cuts[k][self.ex.pp_rank])

    def finish(self) -> dict[str, float]:
        """End the step (collective over pp): the loss parts, and a GRPO op's clip fraction and KL."""
        self.ex.finish_step()
        out = self.trainer.pipeline_parts()
        if self.batch is not None and self.batch.loss == "grpo":
            if len(self.ex.pp_ranks) > 1:
                dist.all_reduce(self.stats, group=self.ex.pp_group)
            clipped, kl = (self.stats / max(1, self.batch.tokens)).tolist()
            out["clip_frac"] = clipped
            if self.batch.kl_coef > 0:
                out["kl"] = kl
        return out

    def _grpo(self, batch: RLBatch, microbatches: list, clip_eps: float, reference):
        """The last stage's loss term of micro-batch mb: the GRPO token terms over its rows, summed under the
        mask and divided by the whole op's target tokens (so the terms add up to the one-process loss)."""
        dev, per = self.trainer.device, microbatches[0][0].shape[0]
        mask = _rows_padded(batch.loss_mask, len(microbatches) * per, dev)
        adv = _rows_padded(batch.advantages, len(microbatches) * per, dev)
        old = None if batch.old_logprobs is None else _rows_padded(batch.old_logprobs, len(microbatches) * per, dev)
        hidden = self.trainer.model.config.hidden_size
        ref = _reference_logprobs(reference, microbatches, hidden, dev) if batch.kl_coef > 0 else {}
        total = max(1, batch.tokens)

        def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
            ids = microbatches[mb][0]
            sl = slice(mb * per, (mb + 1) * per)
            lp = token_logprobs(logits, ids)
            per_token, clipped, kl = grpo_token_terms(lp, lp.detach() if old is None else old[sl], adv[sl],
                                                      clip_eps, ref.get(mb), batch.kl_coef)
            m = mask[sl]
            self.stats += torch.stack([(clipped * m).sum(), (kl * m).sum() if kl is not None
                                       else torch.zeros((), device=dev)]).double()
            return (per_token * m).sum() / total

        return loss


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: log p(ids[:, t] | ids[:, :t]) at t >= 1 from fp32 logits [B, T, V], 0 at t = 0."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def _rows_padded(t: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    pad = rows - t.shape[0]
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _reference_logprobs(reference, microbatches: list, hidden: int, device: torch.device
                        ) -> dict[int, torch.Tensor]:
    """The frozen reference's per-token log-probabilities of each micro-batch, on the rank of its last stage
    (`reference`: a forward-only PipelineExecutor over the reference model's stages)."""
    from parallel.pipeline.overlap import run, stage_forward

    dtype = next(p for s in reference.stages.values() for p in s.parameters()).dtype

    def forward(stage, mb: int, x):
        ids = microbatches[mb][0]
        out, _ = run(stage_forward(stage, ids if x is None else x, None, 1, 1.0))
        return token_logprobs(out, ids) if stage.is_last else out

    shape = (*microbatches[0][0].shape, hidden)
    return reference.run_forward_with(forward, lambda mb: shape, dtype, device)
