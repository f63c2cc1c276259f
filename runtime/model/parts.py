"""What a rank builds of a model under pipeline parallelism: only its stages' layers, and the embedding /
final norm / LM head only where its stages have them.

`LayerStack` holds the decoder layers a rank owns under their model-wide indices (so parameter names stay
the checkpoint's `model.layers.{i}...`); `NotHeld` stands where a part lives on another pipeline rank: it
has no parameters, and a call to it is a clear error; its empty `weight` buffer still says the model's
dtype and device. `holds(parts, name)` says whether a parameter name is on this rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from parallel.pipeline.stages import HeldParts

__all__ = ["HeldParts", "LayerStack", "NotHeld", "holds"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LayerStack(nn.Module):
    """Decoder layers keyed by their index in the whole model; iterates in index order. Indexing takes the
    model-wide index (`stack[7]`), or a slice of the held layers in order (`stack[1:]`)."""

    def __init__(self, layers: Iterable[tuple[int, nn.Module]]) -> None:
        super().__init__()
        for i, layer in layers:
            self.add_module(str(i), layer)

    @property
    def ids(self) -> list[int]:
        return [int(k) for k in self._modules]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self._modules.values())[i]
        try:
            return self._modules[str(int(i))]
        except KeyError:
            raise IndexError(f"decoder layer {i} is not held by this rank (held: {self.ids})") from None

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class NotHeld(nn.Module):
    """A part of the model that another pipeline rank holds (`what` names it). No parameters; the empty,
    non-persistent `weight` buffer follows the model's dtype and device, so code that reads them from
    `model.lm_head.weight` works on every rank."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is held by another pipeline rank (this rank built only its stages)")


def holds(parts: HeldParts | None, name: str) -> bool:
    """Whether the parameter (or buffer) `name` of the whole model is built on a rank holding `parts`."""
    if parts is None or parts.layers is None:
        return True
    if m := _LAYER.match(name):
        return parts.holds_layer(int(m.group(1)))
    if name.startswith("model.embed_tokens."):
        return parts.first
    if name.startswith(("model.norm.", "lm_head.", "mtp.")):
        return parts.last
    return True
