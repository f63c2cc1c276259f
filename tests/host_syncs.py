"""Count the host synchronisations a piece of code would make on a GPU, by running it on the CPU.

On CUDA, reading a device tensor's value on the host (`.item()`, `.tolist()`, `int(t)`, `if t:`, `.cpu()`)
or an op whose output size depends on the data (`nonzero`, `bincount`, boolean-mask indexing, `unique`,
`repeat_interleave` with tensor repeats) makes the CPU wait for the GPU: the launch queue drains and the
overlap of compute and communication is lost. A TorchFunctionMode sees every such call, so CPU runs count
them; each is attributed to the line of project code that made it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / p) for p in ("runtime", "parallel", "ops", "cluster"))

_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}
_DATA_SIZED = {torch.bincount, torch.Tensor.bincount, torch.nonzero, torch.Tensor.nonzero, torch.unique,
               torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select, torch.argwhere}


class HostSyncs(TorchFunctionMode):
    """`with HostSyncs() as s: ...`; then `s.total` and `s.sites` (Counter of "file:line what")."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = None
        if func in _READS or func in _DATA_SIZED:
            what = getattr(func, "__name__", str(func))
        elif func is torch.Tensor.__getitem__ and _bool_index(args[1] if len(args) > 1 else None):
            what = "boolean-mask indexing"
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            what = "repeat_interleave"
        if what is not None:
            site = _site()
            if site is not None:
                self.sites[f"{site} {what}"] += 1
        return func(*args, **kwargs)


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _site() -> str | None:
    """The innermost project frame (None when the call comes from torch or the test itself)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(PROJECT):
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
    return None
