"""A test mode that holds every torch.distributed call to the Mesh's device discipline.

NCCL moves only tensors on the process's GPU, and gloo only host tensors: activations, gradients and
all-to-alls go over the Mesh's device groups with tensors on `mesh.device`; step plans, headers and anything
else the host must read go over the control group (`mesh.group("control")`, gloo) as CPU tensors. gloo on a
CPU machine accepts everything, so a CPU tensor handed to a device group (the classic bug: a buffer made
without `device=`) only fails on the GPU cluster. With `MOERUN_CHECK_DEVICES=1`, `cluster.init` installs this
mode and every collective and p2p call checks its tensors:

- device groups: each tensor must be on `mesh.device` and, since on a CPU machine that proves nothing, must
  not be a host tensor: one made by a torch factory call (`torch.zeros`, `torch.tensor`, ...) without a
  `device=` and not moved since with an explicit `.to(device)`. Tensors computed from placed ones (model
  outputs, gradients) are placed;
- the control group: each tensor must be on the CPU.

A violation raises `DeviceDisciplineError` naming the call, the group and our line that made the call. On a
GPU machine the device test alone is the real one; the host-tensor test is how CPU runs see the same bugs.
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["ENV", "DeviceDisciplineError", "check", "enabled", "install"]

ENV = "MOERUN_CHECK_DEVICES"
# torch.distributed calls whose tensor arguments move over their `group` (isend / irecv are checked through
# batch_isend_irecv, which is how our code posts p2p: P2POp itself insists on the unwrapped functions)
_CALLS = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
          "all_to_all_single", "all_to_all", "send", "recv", "gather", "scatter")
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
              "frombuffer", "from_numpy", "empty_strided", "scalar_tensor", "linspace", "eye")
_TRANSPORT = {str(Path(__file__).resolve()), str(Path(__file__).resolve().with_name("p2p.py"))}
_TORCH = str(Path(torch.__file__).resolve().parent)
_installed: list = []


class DeviceDisciplineError(RuntimeError):
    """A tensor on the wrong side of the host / device line for its process group."""


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def _call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = str(Path(frame.filename).resolve())
        if path not in _TRANSPORT and not path.startswith(_TORCH):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class _HostTensors(TorchFunctionMode):
    """Marks the tensors made by factory calls without `device=` as host tensors; `.to(device)` unmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.factories = {getattr(torch, name) for name in _FACTORIES if hasattr(torch, name)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.factories and isinstance(out, torch.Tensor) and kwargs.get("device") is None:
            out.moerun_host_tensor = True
        elif func is torch.Tensor.to and isinstance(out, torch.Tensor) and _explicit_device(args[1:], kwargs):
            out.moerun_host_tensor = False
        return out


def _explicit_device(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args)


class _Checker:
    def __init__(self, device: torch.device, control: list) -> None:
        self.device, self.control = torch.device(device), control

    def check(self, call: str, tensors: list, group) -> None:
        is_control = any(group is g for g in self.control)
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if is_control:
                bad = None if t.device.type == "cpu" else f"a tensor on {t.device}"
                kind = "the control group (gloo: CPU tensors only)"
            else:
                bad = (f"a tensor on {t.device}" if t.device != self.device and t.device.type != self.device.type
                       else "a host tensor (made without device=)" if getattr(t, "moerun_host_tensor", False)
                       else None)
                kind = f"a device group (tensors on {self.device})"
            if bad is not None:
                raise DeviceDisciplineError(f"{call} on {kind} got {bad} of shape {tuple(t.shape)}, "
                                            f"called from {_call_site()}")


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def check(call: str, tensors: list, group) -> None:
    """Check tensors about to move over `group` (a no-op unless the mode is installed): for transports of
    ours that do not go through a wrapped torch.distributed call (cluster/p2p's NCCL emulation)."""
    if _installed:
        _installed[0].check(call, tensors, group)


def install(device: torch.device, control_groups: list) -> None:
    """Check every torch.distributed call of this process from now on (idempotent; the latest Mesh's
    device and control groups apply)."""
    checker = _Checker(device, control_groups)
    if _installed:
        _installed[0].device, _installed[0].control = checker.device, checker.control
        return
    _installed.append(checker)

    def wrap(name: str):
        real = getattr(dist, name)
        sig = inspect.signature(real)

        def checked(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            checker.check(f"torch.distributed.{name}", _tensors(list(bound.values())), bound.get("group"))
            return real(*args, **kwargs)

        checked.__wrapped__ = real
        setattr(dist, name, checked)

    for name in _CALLS:
        wrap(name)
    real_batch = dist.batch_isend_irecv

    def batch(p2p_op_list):
        for op in p2p_op_list:
            checker.check("torch.distributed.batch_isend_irecv", [op.tensor], op.group)
        return real_batch(p2p_op_list)

    dist.batch_isend_irecv = batch
    mode = _HostTensors()
    mode.__enter__()  # for the rest of the process
    sys.stderr.write(f"[moerun] {ENV}=1: torch.distributed calls checked against device {device}\n")
