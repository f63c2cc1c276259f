"""RL losses on the served model itself: per-token log-probabilities, group-relative advantages, GRPO.

The training forward here is the model's ordinary full-sequence forward (`model.logits`), the same module
objects the serving engine runs, so the log-probabilities a client got from `generate` and the ones the
loss sees differ only by float reassociation (the paged absorbed decode vs the expanded prefill form), and
the router picks the same experts for the same tokens. Alignment used everywhere in this file: a row of
`input_ids` has T tokens; `loss_mask[t] = 1` makes token t a target (predicted from tokens < t), so
`loss_mask[0]` is ignored; `old_logprobs[t]` is log p(token t | tokens < t) under the sampling policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["RLBatch", "group_advantages", "token_logprobs", "grpo_token_terms", "grpo_token_loss", "masked_ce",
           "batch_loss"]


@dataclass
class RLBatch:
    """A padded training batch. `input_ids`, `loss_mask`, `old_logprobs`: [B, T]; `advantages`: [B]."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    loss: str = "ce"
    kl_coef: float = 0.0  # grpo: weight of the KL term to the frozen reference (0: off)

    @property
    def nbytes(self) -> int:
        """Bytes held by the batch's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.loss_mask, self.advantages,
                                                          self.old_logprobs) if t is not None)

    @property
    def tokens(self) -> int:
        """Number of target tokens (the loss is a mean over these)."""
        return int(self.loss_mask[:, 1:].sum())

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], loss_mask: list[list[int]] | None = None,
                   advantages: list[float] | None = None, old_logprobs: list[list[float]] | None = None,
                   loss: str = "ce", kl_coef: float = 0.0) -> RLBatch:
        """Right-pad ragged rows (pad id 0, mask 0: causal attention never lets padding reach real tokens)."""
        b = len(input_ids)
        t = max(len(r) for r in input_ids)
        host = torch.device("cpu")  # a batch off the wire: the trainer moves it to its device
        ids = torch.zeros(b, t, dtype=torch.long, device=host)
        mask = torch.zeros(b, t, dtype=torch.float32, device=host)
        old = torch.zeros(b, t, dtype=torch.float32, device=host) if old_logprobs is not None else None
        for i, row in enumerate(input_ids):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=host)
            m = loss_mask[i] if loss_mask is not None else [1] * len(row)
            mask[i, : len(row)] = torch.tensor(m, dtype=torch.float32, device=host)
            if old is not None:
                old[i, : len(row)] = torch.tensor(old_logprobs[i], dtype=torch.float32, device=host)
        mask[:, 0] = 0.0
        adv = torch.tensor(advantages, dtype=torch.float32, device=host) if advantages is not None else None
        return cls(ids, mask, adv, old, loss, float(kl_coef))


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
                     ) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean (divided by the group's std when `scale`).

    `rewards` [N] holds N / group_size consecutive groups of samples of the same prompt."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return a.reshape(-1)


def token_logprobs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] with log p(input_ids[:, t] | input_ids[:, :t]) at t >= 1 (fp32) and 0 at t = 0."""
    logits = model.logits(input_ids)  # fp32 [B, T, V]
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def grpo_token_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     clip_eps: float = 0.2, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token [B, T]: the GRPO loss term, whether the ratio was clipped (0/1, detached), and the k3 KL
    estimate to the reference (detached; None without a KL term). Masking and averaging are the caller's:
    `grpo_token_loss` in one piece, a pipeline's last stage micro-batch by micro-batch.

    loss_t = -min(r_t A, clip(r_t, 1-eps, 1+eps) A) + kl_coef * (exp(ref - lp) - (ref - lp) - 1),
    r_t = exp(lp_t - old_t); A is the row's advantage."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(logprobs.dtype)
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    per_token = -surr
    kl = None
    if ref_logprobs is not None and kl_coef > 0:
        d = ref_logprobs - logprobs
        kl_t = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl_t
        kl = kl_t.detach()
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_eps).to(logprobs.dtype)
    return per_token, clipped, kl


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                    kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio policy loss, token-level mean over the mask (every token weighs the same, so long
    answers are not down-weighted), optional k3 KL estimate to a frozen reference (off when kl_coef = 0);
    the terms are `grpo_token_terms`'."""
    per_token, clipped, kl = grpo_token_terms(logprobs, old_logprobs, advantages, clip_eps, ref_logprobs, kl_coef)
    stats: dict[str, float] = {"clip_frac": float(_masked_mean(clipped, mask))}
    if kl is not None:
        stats["kl"] = float(_masked_mean(kl, mask))
    return _masked_mean(per_token, mask), stats


def masked_ce(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over the mask."""
    return _masked_mean(-logprobs, mask)


def batch_loss(model, batch: RLBatch, clip_eps: float = 0.2, ref_model=None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one `train` op on `model` (grad-enabled): "ce" or "grpo". Without old_logprobs GRPO is
    on-policy (old = the current logprobs, detached: ratio 1, the plain policy gradient). With
    `batch.kl_coef > 0` the KL term is taken against `ref_model` (frozen; required then)."""
    lp = token_logprobs(model, batch.input_ids)
    mask = batch.loss_mask.to(lp.device)
    if batch.loss == "ce":
        return masked_ce(lp, mask), {}
    if batch.loss != "grpo":
        raise ValueError(f"loss must be 'ce' or 'grpo', got {batch.loss!r}")
    if batch.advantages is None:
        raise ValueError("the grpo loss needs advantages (one per row)")
    old = batch.old_logprobs.to(lp.device) if batch.old_logprobs is not None else lp.detach()
    ref = None
    if batch.kl_coef > 0:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs a frozen reference model")
        with torch.no_grad():
            ref = token_logprobs(ref_model, batch.input_ids)
    return grpo_token_loss(lp, old, batch.advantages.to(lp.device), mask, clip_eps, ref, batch.kl_coef)
