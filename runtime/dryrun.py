"""A dry run: one rank of an N-rank training job, on this machine, through one whole optimizer step, to count
its memory (`moerun dryrun`).

The rank's real runtime code runs (the Trainer: model construction of its stages, TP slices and experts,
the pipeline executor with the configured schedule, the MoE dispatcher, ZeRO-1 AdamW) with torch's fake
process group (every collective and p2p op completes at once: cluster/fake.py) and under `FakeTensorMode`
(tensors have shapes, dtypes and devices but no storage), as torchtitan estimates memory. `DryRunMode`
sits on top of the fake mode and
* records every storage an op makes, with its bytes, until it dies, keeping the peak of the live total and
  which storages made it up (both over the whole step and over its forward/backward alone);
* answers host reads of fake values (`.item()`, `.tolist()`, `bool(t)`: the loss, the gradient norm, id
  checks) with 0: values are meaningless in a dry run. The reads that decide shapes, the MoE dispatcher's
  counts, take the balanced expectation instead (parallel/expert.py, `expected_counts`: per rank, and per
  local expert as a real tensor whose values the host reads);
* computes `torch._grouped_mm`'s output shape itself (its meta kernel accepts only bf16, the CUDA kernel's
  dtype, while moerun runs it in any dtype on CPU).

Nothing is read from disk: model weights are not loaded (the config alone gives the shapes) and the token
data is replaced by one window of zeros. At the end every storage that was live at a peak is attributed to
parameters, gradients, optimizer state (ZeRO-1 master weights and moments) or the rest (activations and
transient buffers).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cluster.fake import is_fake, no_fake_mode

CATEGORIES = ("parameters", "gradients", "optimizer", "activations")


class DryRunMode(TorchDispatchMode):
    """Live storage bytes and their peaks; host reads of fake tensors return 0 (see module docstring)."""

    def __init__(self, progress=None, every_s: float = 30.0) -> None:
        super().__init__()
        self.progress, self.every_s = progress, every_s  # progress(ops, live bytes, peak bytes), every_s apart
        self.next_report = time.perf_counter() + every_s
        self.live: dict[int, tuple[int, int]] = {}   # id(storage) -> (serial, bytes) while it lives
        self.serial = 0
        self.total = 0
        self.peak, self.peak_set = 0, {}             # at the peak: serial -> bytes
        self.phase_peak, self.phase_set = 0, {}
        self.in_phase = False
        self.ops = 0
        self.phase_ops = [0, 0]  # forward, backward
        self.traffic = [0, 0, 0]  # bytes read + written by element-wise ops: forward, backward, rest of the step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "prim":  # fake tensors' own metadata queries (prim.device): not ops the code runs
            return func(*args, **(kwargs or {}))
        self.ops += 1
        if self.in_phase:  # the forward/backward's ops, split by whether autograd's engine runs them
            self.phase_ops[torch._C._current_graph_task_id() != -1] += 1
        if self.progress is not None and not self.ops % 4096 and time.perf_counter() > self.next_report:
            self.next_report = time.perf_counter() + self.every_s
            self.progress(self.ops, self.total, self.peak)
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if not is_fake(t):  # a real tensor (the dispatcher's expected counts): its value
                with no_fake_mode():
                    return func(*args)
            return False if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point else 0)
        if func is torch.ops.aten._grouped_mm.default:
            out = _grouped_mm_output(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        grew = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                grew |= self._track(t.untyped_storage())
        if grew:
            self._peaks()
            if func not in _COMPUTE_OPS:  # new data from memory-bound work: what it read and wrote
                part = (torch._C._current_graph_task_id() != -1) if self.in_phase else 2
                self.traffic[part] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                          if isinstance(t, torch.Tensor))
        return out

    def start_phase(self) -> None:
        self.in_phase, self.phase_peak, self.phase_set = True, self.total, self.snapshot()

    def _track(self, st) -> bool:
        key = id(st)
        if key in self.live:
            return False
        n = st.nbytes()
        self.serial += 1
        self.live[key] = (self.serial, n)
        self.total += n
        weakref.finalize(st, self._free, key)
        return True

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key, (0, 0))[1]

    def snapshot(self) -> dict[int, int]:
        return dict(self.live.values())

    def _peaks(self) -> None:
        if self.total > self.peak:
            self.peak, self.peak_set = self.total, self.snapshot()
        if self.in_phase and self.total > self.phase_peak:
            self.phase_peak, self.phase_set = self.total, self.snapshot()

    def serials(self, tensors) -> set[int]:
        """The serials of the (live) storages of `tensors`."""
        out = set()
        for t in tensors:
            if t is not None and id(t.untyped_storage()) in self.live:
                out.add(self.live[id(t.untyped_storage())][0])
        return out

    @staticmethod
    def breakdown(snapshot: dict[int, int], known: dict[str, set[int]]) -> dict[str, int]:
        """Bytes of a peak's storages by category (`known`: category -> serials); the rest is activations
        (and transient buffers)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for serial, n in snapshot.items():
            out[next((c for c, ids in known.items() if serial in ids), "activations")] += n
        return out


_COMPUTE_OPS = {getattr(torch.ops.aten, n).default for n in (
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward")}  # GEMMs and attention: the planner times these


def _grouped_mm_output(a: torch.Tensor, b: torch.Tensor, offs=None, bias=None, out_dtype=None) -> torch.Tensor:
    """The (empty) result of `torch._grouped_mm`: its meta kernel accepts only the dtypes of the CUDA kernel
    (bf16), while moerun runs it in any dtype on CPU; the shapes follow the op's four forms."""
    if a.dim() == 2 and b.dim() == 3:
        shape = (a.shape[0], b.shape[-1])
    elif a.dim() == 3 and b.dim() == 2:
        shape = (a.shape[1], b.shape[-1])
    elif a.dim() == 2 and b.dim() == 2:
        shape = (offs.shape[0], a.shape[0], b.shape[1])
    else:
        shape = (a.shape[0], a.shape[1], b.shape[-1])
    return a.new_empty(shape, dtype=out_dtype or a.dtype)


def dry_run(config: dict, world: int, rank: int, ranks_per_node: int = 8, log=None) -> dict[str, Any]:
    """Rank `rank` of a `world`-rank run of `config` (a parsed job config) through one optimizer step under
    fake tensors; returns its memory (bytes) by category, its peaks, and how long the dry run took."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cluster.fake import fake_mesh
    from runtime.train.trainer import Trainer

    log = log or (lambda msg: None)
    cfg = copy.deepcopy(config)
    par, tr, data = cfg["parallel"], cfg["train"], cfg["data"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moerun-dryrun-") as tmp:
        zeros = os.path.join(tmp, "zeros.npy")
        import numpy as np

        np.save(zeros, np.zeros(data["seq_len"] + 1, dtype=np.int32))
        cfg["data"] = {**data, "path": zeros, "shuffle": False}
        cfg["train"] = {**tr, "out": os.path.join(tmp, "out"), "save_every": 0, "resume": False}
        with fake_mesh(world, rank, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"],
                       ranks_per_node=ranks_per_node) as mesh:
            mode = DryRunMode(progress=lambda ops, live, peak: log(
                f"  ... {ops:,} ops, {live / 1e9:.2f} GB live, peak so far {peak / 1e9:.2f} GB "
                f"({time.perf_counter() - t0:.0f} s)"))
            with FakeTensorMode(allow_non_fake_inputs=True), mode:
                log(f"building rank {rank}'s model ({mesh.describe()})")
                trainer = Trainer(cfg, mesh, log=lambda msg: None)
                t_build = time.perf_counter() - t0
                n = tr["global_batch"] // mesh.size("dp")
                inputs = torch.zeros((n, data["seq_len"]), dtype=torch.long, device=trainer.device)
                labels = torch.zeros_like(inputs)
                trainer.model.train()
                chunks = trainer.microbatch_slices(n)
                log(f"forward/backward of {len(chunks)} micro-batches of {n // len(chunks)} sequences x "
                    f"{data['seq_len']} tokens ({par['schedule'] if mesh.size('pp') > 1 else 'no pipeline'})")
                mode.start_phase()
                trainer.forward_backward(inputs, labels, chunks)
                mode.in_phase = False
                log("optimizer step")
                trainer.apply_gradients()
                params = [p for _, p in trainer.named_parameters()]
                known = {"parameters": mode.serials(params + [b for _, b in trainer.named_buffers()]),
                         "gradients": mode.serials(p.grad for p in params),
                         "optimizer": mode.serials(t for b in trainer.optimizer.buckets
                                                   for t in (b.master, b.exp_avg, b.exp_avg_sq))}
                step = mode.breakdown(mode.phase_set, known)
                whole = mode.breakdown(mode.peak_set, known)
                held = mode.breakdown(mode.snapshot(), known)
                report = {
                    "world": world, "rank": rank, "coords": {d: mesh.coord(d) for d in ("pp", "dp", "tp", "ep")},
                    "layout": {d: mesh.size(d) for d in ("pp", "dp", "tp", "ep")}, "schedule": par["schedule"],
                    "microbatches": len(chunks), "sequences_per_microbatch": n // len(chunks),
                    "seq_len": data["seq_len"], "layers": trainer.model.model.layers.ids,
                    "parameters": held["parameters"], "gradients": held["gradients"],
                    "optimizer": held["optimizer"], "activations": step["activations"],
                    "gradients_at_peak": step["gradients"],
                    "peak_forward_backward": mode.phase_peak, "peak": mode.peak,
                    "peak_breakdown": whole, "ops": mode.ops, "ops_forward": mode.phase_ops[0],
                    "ops_backward": mode.phase_ops[1], "elementwise_bytes": dict(zip(
                        ("forward", "backward", "rest"), mode.traffic)),
                    "build_s": round(t_build, 1), "elapsed_s": round(time.perf_counter() - t0, 1),
                }
    return report


def planner_prediction(config: dict, world: int, rank: int, ranks_per_node: int = 8) -> dict[str, float]:
    """The planner's memory of the same rank (parallel/planner, recipe "moerun": moerun's own trainer, the
    model's dtype, no reserve), from the job config alone: what `moerun dryrun` prints beside the dry run."""
    from cluster.layout import Layout
    from parallel.planner.costmodel import Setup
    from parallel.planner.hardware import get_gpu
    from parallel.planner.models import from_hf_config, with_overrides
    from parallel.planner.search import Candidate, Planner
    from runtime.model.builtin import builtin_config
    from runtime.model.config import ModelConfig

    par, tr, data, path = config["parallel"], config["train"], config["data"], config["model"]["path"]
    cfg = builtin_config(path) if path.startswith("builtin:") else ModelConfig.from_file(path)
    spec = from_hf_config(cfg.to_hf_dict(), name=path)
    if tr["mtp_loss_coef"] <= 0:  # the trainer builds no MTP module then
        spec = with_overrides(spec, mtp_layers=0)
    rpn = ranks_per_node if world % ranks_per_node == 0 else world
    lay = Layout(world, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"], ranks_per_node=rpn)
    dp = lay.size("dp")
    per_dp = tr["global_batch"] // dp
    mbs = per_dp // par["microbatches"] if par["pp"] > 1 else per_dp // max(
        m for m in range(1, min(par["microbatches"], per_dp) + 1) if per_dp % m == 0)
    setup = Setup(seq_len=data["seq_len"], global_batch=tr["global_batch"], recipe="moerun", reserve_gb=0.0,
                  dtype_bytes=4 if config["model"]["dtype"] == "float32" else 2)
    planner = Planner(spec, get_gpu("h800"), world // rpn, rpn, setup)
    cand = Candidate(par["tp"], par["pp"], par["ep"], dp, par["schedule"] if par["pp"] > 1 else "1f1b", mbs, "none")
    return planner.rank_memory(cand, lay.coords(rank)["pp"])

