"""Device placement of the pipeline executor and the phase engine, checked on CPU.

On CPU a tensor created without `device=` lands on the right device by accident, so no numeric test can see
the bug that matters on GPU: a p2p receive buffer, a loss all-reduced over pp, or a backward scatter buffer
made on the CPU while the stages live on CUDA (NCCL then refuses it, or an op mixes devices). Two checks
catch it here instead:

1. Dynamic: the executor runs real steps (pp=2 with p2p RECV/SEND, FB pairs, the loss all-reduce and the
   forward-only logits broadcast; pp=1 x ep=2 with the dispatch / combine nodes' hand-written backward, split
   into I and W) under a TorchFunctionMode that sees every tensor factory call (torch.empty / zeros / tensor /
   full / arange ...; PyTorch routes factories through function modes). A call is reported when it has no
   explicit `device=` and its *direct caller* (the Python frame right above the factory) is a file of the
   pipeline / expert-parallel code. Taking the direct caller, not any frame on the stack, keeps torch's own
   internals and the model's code (runtime/, with its own device handling) out of it, and flags exactly the
   line to fix. `new_*` / `*_like` factories inherit their source tensor's device and are not reported. The
   mode also counts the calls *with* a device from those files, so that a torch that stopped routing
   factories through modes (or a path that stopped running) fails the test instead of passing it vacuously.
2. Static: an AST scan of the same files for `torch.<factory>(...)` calls without a `device=` keyword. It
   covers branches the runs above do not reach (the rule is simple: every factory there names its device).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from dist_spawn import run_spawn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
# the code on the executor's path that creates tensors itself
CHECKED = [ROOT / "parallel" / "pipeline" / "executor.py", ROOT / "parallel" / "pipeline" / "overlap.py",
           ROOT / "parallel" / "pipeline" / "wgrad.py", ROOT / "parallel" / "pipeline" / "stages.py",
           ROOT / "parallel" / "expert.py", ROOT / "parallel" / "link.py",
           *sorted((ROOT / "runtime" / "serve").glob("*.py")),  # serving and the shared scheduler: their
           *sorted((ROOT / "runtime" / "sched").glob("*.py"))]  # control-plane host tensors name device="cpu"
FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
             "eye", "linspace", "logspace", "empty_strided", "scalar_tensor")


class FactoryDevices(TorchFunctionMode):
    """Records factory calls made directly from CHECKED files: `missing` (no device=) and `placed`."""

    def __init__(self) -> None:
        super().__init__()
        self.files = {str(p) for p in CHECKED}
        self.missing: list[str] = []
        self.placed: list[str] = []
        self.funcs = {getattr(torch, name) for name in FACTORIES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.funcs:
            caller = sys._getframe(1)
            path = str(Path(caller.f_code.co_filename).resolve())
            if path in self.files:
                where = f"{Path(path).relative_to(ROOT)}:{caller.f_lineno} torch.{func.__name__}"
                (self.placed if kwargs.get("device") is not None else self.missing).append(where)
        return func(*args, **kwargs)


def test_the_mode_sees_factories_without_a_device() -> None:
    """The recorder itself: a bare factory from a checked file is reported, one with a device is not."""
    mode = FactoryDevices()
    mode.files.add(str(Path(__file__).resolve()))
    with mode:
        torch.zeros(2, dtype=torch.float64)
        torch.tensor([1, 2])
        torch.empty((1, 2), device="cpu")
        torch.ones(3).new_zeros(2)  # inherits the device: not a factory of the list
    assert [m.split(" ")[-1] for m in mode.missing] == ["torch.zeros", "torch.tensor", "torch.ones"]
    assert [m.split(" ")[-1] for m in mode.placed] == ["torch.empty"]


def test_no_factory_without_device_in_the_source() -> None:
    bad = []
    for path in CHECKED:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.{node.func.attr}")
    assert not bad, f"tensor factories without device= (they land on the CPU when the stages are on GPU): {bad}"


def test_single_rank_step_places_every_tensor() -> None:
    from executor_cases import microbatches, tiny_model

    from parallel.pipeline import build
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stages import build_stages

    model = tiny_model()
    sched = build("zb1p", 1, 2)
    ex = PipelineExecutor(build_stages(model, sched, 0), sched, pp_ranks=[0], pp_rank=0)
    mode = FactoryDevices()
    with mode:
        ex.run_step(microbatches(model.config.vocab_size, 2))
    assert not mode.missing, mode.missing
    assert any("executor.py" in p for p in mode.placed), mode.placed  # the loss buffer at least


def _devices_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from executor_cases import microbatches, tiny_model

    from parallel.expert import Dispatcher
    from parallel.pipeline import build, forward_only
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stages import build_stages
    from runtime.model.loading import shard_model

    group, ranks = dist.group.WORLD, list(range(world))
    mode = FactoryDevices()
    mbs = microbatches(96, 4)
    # pp=2: RECV buffers, local hand-over and FB pairs (DualPipeV), the loss all-reduce, the logits broadcast
    model = tiny_model()
    sched = build("dualpipev", 2, 4)
    stages = build_stages(model, sched, rank)
    ex = PipelineExecutor(stages, sched, pp_group=group, pp_ranks=ranks, pp_rank=rank)
    fwd = PipelineExecutor(stages, forward_only(sched), pp_group=group, pp_ranks=ranks, pp_rank=rank)
    with mode:
        ex.run_step(mbs)
        fwd.run_forward([ids for ids, _ in mbs])
    # pp=1 x ep=2: dispatch / combine nodes, their backward all-to-alls, split into I and W
    base = tiny_model()
    model = shard_model(base, Dispatcher(base.config.n_routed_experts, group))
    one = build("zb1p", 1, 2)
    ex = PipelineExecutor(build_stages(model, one, 0), one, pp_group=None, pp_ranks=[0], pp_rank=0)
    with mode:
        ex.run_step(mbs[:2])
    assert not mode.missing, f"rank {rank}: tensors created without a device: {sorted(set(mode.missing))}"
    for name in ("executor.py", "expert.py"):
        assert any(name in p for p in mode.placed), (rank, name, sorted(set(mode.placed)))


@pytest.mark.timeout(180)
def test_pipeline_steps_place_every_tensor_on_two_ranks() -> None:
    run_spawn(_devices_worker, 2)
