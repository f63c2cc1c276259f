"""Expert load balancing (DeepSeek-V3 report, sec. 2.1.2): the aux-loss-free bias and the sequence-wise loss.

Aux-loss-free: every MoE layer has a per-expert bias added to the affinities for *selection only*. Once
per optimizer step, each bias moves by `rate` toward balance: `b_i += rate * sign(mean_load - load_i)`,
where load_i counts the (token, expert) pairs routed to expert i over the whole step (all micro-batches),
summed over every rank that holds a copy of that gate (pass that group, e.g. the stage's dp x tp ranks;
copies that see the same tokens, like TP peers without sequence parallelism, scale every load by the same
factor, which leaves the sign unchanged). All ranks apply the same update from the same reduced loads, so
the replicated biases stay identical.

Counting once: `record` ignores calls made during a backward pass (activation recompute re-runs the
forward inside backward), and a record keyed by `microbatch` replaces an earlier one with the same key.

Sequence-wise loss (eq. 17-20): per sequence of T tokens,
    f_i = E / (K T) * #{t : i in TopK(t)},  P_i = 1/T * sum_t s_it / sum_j s_jt,  L = alpha * sum_i f_i P_i
averaged over sequences; f carries no gradient.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where activation recompute happens)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many (token, expert) pairs chose each expert (-1 slots ignored)."""
    flat = topk_idx.reshape(-1).long() + 1  # bin 0 gathers the -1 slots (scatter_add: no host sync)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[1:]


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss. scores: [B, T, E] affinities s_it (pre-bias, e.g. sigmoid outputs);
    topk_idx: [B, T, K] chosen experts; mask: optional [B, T] bool of real (non-padding) tokens."""
    if scores.dim() != 3 or topk_idx.dim() != 3 or scores.shape[:2] != topk_idx.shape[:2]:
        raise ValueError(f"scores [B,T,E] and topk_idx [B,T,K] expected, got {tuple(scores.shape)} and "
                         f"{tuple(topk_idx.shape)}")
    B, T, E = scores.shape
    K = topk_idx.shape[-1]
    m = torch.ones(B, T, dtype=scores.dtype, device=scores.device) if mask is None else mask.to(scores.dtype)
    tokens = m.sum(1).clamp(min=1)                                                       # [B]
    chosen = torch.zeros(B, T, E, dtype=scores.dtype, device=scores.device)
    chosen.scatter_add_(2, topk_idx.clamp(min=0), (topk_idx >= 0).to(scores.dtype))
    f = (chosen * m.unsqueeze(-1)).sum(1) * E / (K * tokens.unsqueeze(1))             # [B, E]
    s_norm = scores / scores.sum(-1, keepdim=True)
    P = (s_norm * m.unsqueeze(-1)).sum(1) / tokens.unsqueeze(1)                        # [B, E]
    return alpha * (f.detach() * P).sum(-1).mean()


class ExpertBalancer:
    """Hooks the trainer calls: `record` per MoE layer forward, `aux_loss` for the loss, `step` once
    per optimizer step (after the optimizer, or anywhere between steps: it only touches the biases).

    biases: one [E] tensor per MoE layer (the gates' e_score_correction_bias), updated in place.
    group: the ranks holding copies of these gates whose loads should be summed (None: this process), or
    a sequence of groups whose product is that set, reduced one after the other (e.g. `[mesh.group("dp"),
    mesh.group("tp")]` for the dp x tp ranks of a pipeline stage, for which the Mesh has no single group).
    """

    def __init__(self, biases: Sequence[torch.Tensor], rate: float,
                 group: ProcessGroup | Sequence[ProcessGroup] | None = None,
                 aux_loss_coef: float = 0.0) -> None:
        if len(biases) == 0:
            raise ValueError("ExpertBalancer needs at least one bias tensor")
        sizes = {b.numel() for b in biases}
        if len(sizes) != 1:
            raise ValueError(f"all biases must have the same number of experts, got sizes {sorted(sizes)}")
        self.biases = list(biases)
        self.num_experts = sizes.pop()
        self.rate, self.aux_loss_coef = rate, aux_loss_coef
        self.groups = [] if group is None else list(group) if isinstance(group, (list, tuple)) else [group]
        self._records: dict[tuple[int, Hashable], torch.Tensor] = {}
        self._anon = itertools.count()
        self.last_loads: torch.Tensor | None = None  # [L, E] loads of the last step (metrics)

    def record(self, layer: int, topk_idx: torch.Tensor, microbatch: Hashable | None = None) -> None:
        """Count one forward's routing for `layer`. Ignored inside backward (recompute)."""
        if _in_backward():
            return
        self.record_counts(layer, expert_load(topk_idx.detach(), self.num_experts), microbatch)

    def record_counts(self, layer: int, counts: torch.Tensor, microbatch: Hashable | None = None) -> None:
        """Like `record`, from precomputed [E] counts (e.g. the runtime Gate's `last_load`)."""
        if not 0 <= layer < len(self.biases):
            raise IndexError(f"layer {layer} out of range for {len(self.biases)} MoE layers")
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts.shape)}")
        if _in_backward():
            return
        key = next(self._anon) if microbatch is None else ("mb", microbatch)
        self._records[(layer, key)] = counts.detach().long()  # stays on its device until the step

    def pending_loads(self) -> torch.Tensor:
        """[L, E] int64 loads recorded on this rank since the last step (not yet reduced), on the biases'
        device."""
        loads = torch.zeros(len(self.biases), self.num_experts, dtype=torch.long, device=self.biases[0].device)
        for (layer, _), counts in self._records.items():
            loads[layer] += counts.to(loads.device)
        return loads

    def aux_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sequence-wise balance loss with this balancer's coefficient (0 when the coefficient is 0)."""
        if self.aux_loss_coef == 0:
            return scores.new_zeros(())
        return sequence_balance_loss(scores, topk_idx, self.aux_loss_coef, mask)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Reduce this step's loads over the group, move every bias by +-rate, reset. Collective: every
        rank of the group calls it once per optimizer step. Returns the reduced [L, E] loads."""
        loads = self.pending_loads()
        self._records.clear()
        device = self.biases[0].device
        loads = loads.to(device)
        for group in self.groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(loads, group=group)
        loads_f = loads.double()
        direction = torch.sign(loads_f.mean(dim=1, keepdim=True) - loads_f)              # [L, E]
        for bias, d in zip(self.biases, direction, strict=True):
            bias.add_(d.to(bias.dtype).view_as(bias), alpha=self.rate)
        self.last_loads = loads.cpu()
        return self.last_loads

    @staticmethod
    def imbalance(loads: torch.Tensor) -> torch.Tensor:
        """Per layer max load / mean load (1.0 = perfectly balanced); a metric for logs."""
        loads = loads.double()
        return loads.max(dim=-1).values / loads.mean(dim=-1).clamp(min=1e-12)
