"""Split a DeepSeek model into pipeline stages, and sum the gradients of DualPipe's mirrored copies.

Stage s of S holds a contiguous slice of the decoder layers; stage 0 also holds the token embedding, stage
S-1 the final norm and the LM head (the loss is computed there). Layers are balanced: every stage gets
L // S layers and the remainder goes to interior stages first (the end stages also carry embedding / head).
A stage *references* the submodules of the model it was cut from, so parameter objects and names survive:
`stage.full_named_parameters()` yields the model's own names (`model.layers.3.mlp.gate.weight`, ...).

The model cuts its own stages: `build_stages` asks `model.pipeline_stage(stage, num_stages, layers)`, which
hands this module's `PipelineStage` the parts explicitly (embedding, decoder layers by id, final norm, head,
rotary embedding, and the names of those parts in the model), so nothing here knows a model's attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cluster import p2p

from .schedule import Schedule, ScheduleError, layer_split

__all__ = ["HeldParts", "PipelineStage", "build_stages", "held_parts", "layer_split", "sum_mirrored_grads"]


@dataclass(frozen=True)
class HeldParts:
    """What one pipeline rank builds of a model: its stages' decoder layers, and whether it holds the first
    stage (token embedding) and the last (final norm, LM head, MTP). `layers` None: every layer (no pipeline)."""

    layers: tuple[int, ...] | None = None
    first: bool = True
    last: bool = True

    def holds_layer(self, i: int) -> bool:
        return self.layers is None or i in self.layers


def held_parts(num_layers: int, kind: str, pp: int, pp_rank: int) -> HeldParts:
    """The parts pipeline rank `pp_rank` of a `kind` schedule over `pp` ranks holds (both stages under
    DualPipe(V)), with the layers of `layer_split`. The placement does not depend on the micro-batch count."""
    from .schedule import build

    if pp == 1:
        return HeldParts()
    if not 0 <= pp_rank < pp:
        raise ScheduleError(f"pp_rank {pp_rank} out of range for {pp} pipeline ranks")
    sched = build(kind, pp, 2 * pp, check=False)
    split = layer_split(num_layers, sched.num_stages)
    stages = sorted(sched.stages_of(pp_rank).values())
    layers = tuple(i for s in stages for i in split[s])
    return HeldParts(tuple(sorted(layers)), 0 in stages, sched.num_stages - 1 in stages)


class PipelineStage(nn.Module):
    """One pipeline stage: [embedding] + decoder layers + [final norm + LM head].

    `forward(x)` is the plain (non-overlapped) forward: x is input_ids [B,T] on the first stage, hidden
    states [B,T,H] elsewhere; returns hidden states, or normed-and-projected logits on the last stage. The
    executor runs the same computation phase by phase (parallel/pipeline/overlap.py). `names` gives each
    part's name in the whole model: keys "embed", "layers", "norm", "head" (and "mtp").

    MTP (multi-token prediction) lives on the last stage: `mtp` holds its modules (their parameters are the
    stage's) and `mtp_loss(hn, emb, labels)` gives each module's summed cross-entropy from the final-normed
    hidden states and the first stage's embeddings of the same tokens, which the executor carries along.
    """

    def __init__(self, stage: int, num_stages: int, *, embed: nn.Module | None, layers: dict[int, nn.Module],
                 norm: nn.Module | None, head: nn.Module | None, rotary, names: dict[str, str],
                 mtp: nn.Module | None = None, mtp_loss=None) -> None:
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        if self.is_first != (embed is not None) or self.is_last != (head is not None and norm is not None):
            raise ValueError(f"stage {stage} of {num_stages}: the embedding belongs to the first stage and the "
                             "norm and head to the last, exactly")
        self.layer_ids = sorted(layers)
        self.embed_tokens = embed
        self.layers = nn.ModuleDict({str(i): layers[i] for i in self.layer_ids})
        self.norm = norm
        self.lm_head = head
        self.rotary = rotary  # plain object, not a module: no parameters
        if (mtp is not None) != (mtp_loss is not None) or (mtp is not None and not self.is_last):
            raise ValueError("MTP modules (with their loss) belong to the last stage only")
        self.mtp = mtp
        self.mtp_loss = mtp_loss
        self._prefix = {"embed_tokens": names["embed"], "layers": names["layers"], "norm": names["norm"],
                        "lm_head": names["head"], "mtp": names.get("mtp", "mtp")}

    def rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(torch.arange(t, device=device), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.is_first else x
        cos, sin = self.rope(h.shape[1], h.device, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.is_last:
            h = self.lm_head(self.norm(h))
        return h

    def full_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters under the names they have in the whole model (checkpoint names)."""
        for name, p in self.named_parameters():
            head, rest = name.split(".", 1)
            yield f"{self._prefix[head]}.{rest}", p


def build_stages(model: nn.Module, schedule: Schedule, pp_rank: int) -> dict[int, PipelineStage]:
    """{chunk: stage module} that pipeline rank `pp_rank` holds under `schedule` (DualPipe(V): two), cut by
    the model's own `pipeline_stage(stage, num_stages, layers)` with the layers of `layer_split`."""
    if not 0 <= pp_rank < schedule.pp:
        raise ScheduleError(f"pp_rank {pp_rank} out of range for a {schedule.pp}-rank schedule")
    split = layer_split(model.config.num_hidden_layers, schedule.num_stages)
    return {c: model.pipeline_stage(s, schedule.num_stages, split[s]) for c, s in schedule.stages_of(pp_rank).items()}


def _flat_grads(stage: nn.Module, device: torch.device) -> torch.Tensor:
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in stage.parameters()]
    if not parts:  # a stage without parameters still sends (an empty tensor, on the p2p device)
        return torch.zeros(0, device=device)
    return torch.cat(parts)


def sum_mirrored_grads(stages: dict[int, PipelineStage], schedule: Schedule, pp_rank: int,
                       pp_group: dist.ProcessGroup, pp_ranks: list[int], device: torch.device | str = "cpu"
                       ) -> None:
    """DualPipe: make both copies of every stage hold the sum of their gradients.

    Rank r's chunk 0 (stage r) and rank P-1-r's chunk 1 are the same stage; each rank sends both chunks'
    flattened gradients to its mirror and adds what it receives (chunk 0 gets the mirror's chunk 1 and vice
    versa). Both copies end bit-identical (a + b == b + a). No-op for schedules with one copy per stage.
    `device` is where a stage without parameters makes its empty buffer (the stages' device).
    """
    if schedule.kind != "dualpipe":
        return
    peer = pp_ranks[schedule.pp - 1 - pp_rank]
    mine = [_flat_grads(stages[0], device), _flat_grads(stages[1], device)]
    peer_c0 = torch.empty_like(mine[1])  # the mirror's chunk 0 is the stage of my chunk 1, and vice versa
    peer_c1 = torch.empty_like(mine[0])
    ops = [p2p.Op("send", mine[0], peer, "mirror grads chunk 0"), p2p.Op("send", mine[1], peer, "mirror grads chunk 1"),
           p2p.Op("recv", peer_c0, peer, "mirror grads chunk 0"), p2p.Op("recv", peer_c1, peer, "mirror grads chunk 1")]
    for work in p2p.channel(pp_group).post(ops):
        work.wait()
    for chunk, incoming in ((0, peer_c1), (1, peer_c0)):
        offset = 0
        for p in stages[chunk].parameters():
            n = p.numel()
            add = incoming[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = add.clone()
            else:
                p.grad.add_(add)
            offset += n
