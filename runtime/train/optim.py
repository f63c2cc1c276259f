"""AdamW with fp32 master weights and ZeRO-1 sharding, global gradient-norm clipping, warmup + cosine LR.

ZeRO-1: the parameters of one kind (dense or expert, with or without weight decay) are laid end to end in
one flat fp32 space, padded to a multiple of the group size; data-parallel rank r owns the contiguous
slice r of it and keeps the master weights and both Adam moments for that slice only, so optimizer memory
per rank is ~1/dp of the whole. Dense parameters shard over `dp`, expert parameters over `edp` (the ranks
that hold the same experts). After the update each rank all-gathers the slices and copies them into the
model's (possibly bfloat16) parameters. Gradients arrive already reduced over dp/edp (parallel.shard), so
every rank can read its slice directly.

The update is torch.optim.AdamW's (decoupled decay `p *= 1 - lr*wd`, bias-corrected moments), so a
single-process run agrees with a plain `torch.optim.AdamW` loop over the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from cluster import group_rank, group_size


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup_steps` steps reaching
    `lr` at step warmup_steps-1, then a half cosine from `lr` (at step warmup_steps) toward `min_lr`
    (reached at step total_steps)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Slot:
    name: str
    param: nn.Parameter
    offset: int  # start of this parameter in the bucket's flat space


class _Bucket:
    """One flat space of parameters sharing (shard group, weight decay)."""

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], group: ProcessGroup | None,
                 weight_decay: float) -> None:
        self.group, self.weight_decay = group, weight_decay
        self.slots, off = [], 0
        for name, p in params:
            self.slots.append(Slot(name, p, off))
            off += p.numel()
        self.total = off
        n = group_size(group)
        self.shard = -(-self.total // n) if self.total else 0
        self.lo = min(self.total, group_rank(group) * self.shard)
        self.hi = min(self.total, self.lo + self.shard)
        self.master = self._gather_local(lambda s: s.param.detach())
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)

    def _gather_local(self, get: Callable[[Slot], torch.Tensor | None]) -> torch.Tensor:
        """This rank's [lo, hi) slice of the flat space, built from per-parameter tensors (None = zeros)."""
        dev = self.slots[0].param.device if self.slots else torch.device("cpu")
        out = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=dev)
        for s in self.slots:
            a, b = max(self.lo, s.offset), min(self.hi, s.offset + s.param.numel())
            if a >= b:
                continue
            t = get(s)
            if t is not None:
                out[a - self.lo: b - self.lo] = t.reshape(-1)[a - s.offset: b - s.offset].float()
        return out

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole flat space from every rank's slice."""
        n = group_size(self.group)
        if n == 1:
            return local
        padded = torch.zeros(self.shard, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.total]

    def grad_slice(self) -> torch.Tensor:
        return self._gather_local(lambda s: s.param.grad)

    @torch.no_grad()
    def update(self, grad: torch.Tensor, lr: float, betas: tuple[float, float], eps: float, t: int) -> None:
        b1, b2 = betas
        if self.weight_decay:
            self.master.mul_(1 - lr * self.weight_decay)
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / bc1)

    @torch.no_grad()
    def write_params(self) -> None:
        flat = self._all_gather(self.master)
        for s in self.slots:
            s.param.copy_(flat[s.offset: s.offset + s.param.numel()].view_as(s.param))

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {master, exp_avg, exp_avg_sq}} in the parameter's (local) shape. Collective."""
        out: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in self.slots}
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            flat = self._all_gather(getattr(self, kind))
            for s in self.slots:
                out[s.name][kind] = flat[s.offset: s.offset + s.param.numel()].view(s.param.shape).clone()
        return out

    def load_state(self, get: Callable[[str, str], torch.Tensor]) -> None:
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            setattr(self, kind, self._gather_local(lambda s, k=kind: get(s.name, k)))

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq))


class ZeroAdamW:
    """AdamW over named parameters. `expert(name)` says which parameters shard over `edp_group` instead of
    `dp_group`; `decay(name, p)` which get weight decay (default: tensors of 2+ dims, not norms/biases)."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float,
                 betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 dp_group: ProcessGroup | None = None, edp_group: ProcessGroup | None = None,
                 expert: Callable[[str], bool] = lambda name: False,
                 decay: Callable[[str, nn.Parameter], bool] | None = None) -> None:
        self.lr, self.betas, self.eps = lr, (float(betas[0]), float(betas[1])), eps
        self.steps = 0
        decay = decay or (lambda name, p: p.dim() >= 2)
        kinds: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
        for name, p in named_params:
            if p.requires_grad:
                kinds.setdefault((expert(name), decay(name, p)), []).append((name, p))
        self.buckets = [
            _Bucket(params, edp_group if is_expert else dp_group, weight_decay if has_decay else 0.0)
            for (is_expert, has_decay), params in sorted(kinds.items())
        ]

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """One update with gradients multiplied by `grad_scale` (the clipping coefficient)."""
        self.steps += 1
        lr = self.lr if lr is None else lr
        for b in self.buckets:
            g = b.grad_slice()
            if grad_scale != 1.0:
                g.mul_(grad_scale)
            b.update(g, lr, self.betas, self.eps, self.steps)
            del g  # not held through the next bucket's update nor the all-gathers below
        for b in self.buckets:
            b.write_params()

    def state_bytes(self) -> int:
        """Bytes of optimizer state (master weights + both moments) held by this rank."""
        return sum(b.state_bytes() for b in self.buckets)

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.buckets:
            out.update(b.full_state())
        return out

    def load_state(self, get: Callable[[str, str], torch.Tensor], steps: int) -> None:
        """Fill every bucket from `get(param name, kind)` (tensors in the local parameter's shape) and write
        the master weights into the parameters."""
        for b in self.buckets:
            b.load_state(get)
            b.write_params()
        self.steps = steps


def global_grad_norm(grads: Iterable[torch.Tensor], group: ProcessGroup | None = None,
                     device: torch.device | str = "cpu") -> float:
    """sqrt(sum of squares) of the given gradients, summed over `group`. The caller passes each parameter
    once across the whole job (see Trainer: dp/edp copies and TP-replicated parameters count on one rank)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += g.detach().float().pow(2).sum().double().to(device)
    if group_size(group) > 1:
        dist.all_reduce(total, group=group)
    return math.sqrt(float(total))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1 (0 max_norm: off)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
