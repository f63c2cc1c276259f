"""Where a serving engine's decode step goes: model compute against host overhead, and the matmul ceiling.

Used by bench/serve.py and bench/speculative.py. Definitions (the same for every engine version, so the
figures compare):

* decode step time: wall time of one `Engine.step()` while every request of the batch is decoding
  (measured without the profiler), and the process CPU time it took (less sensitive to other load).
* the split: the same steps run again under `torch.profiler` (wall time measured there too, so a change of
  machine load between the two runs cannot skew it). Model compute is the arithmetic inside torch's
  operators: each aten operator's self time (its children excluded) minus the cost of calling an operator
  at all (the median self time of a one-element `torch.add`, measured the same way just before); pure
  metadata operators (views, reshapes, empty allocations) count as nothing. Host overhead = profiled step
  time - model compute: Python (scheduling, plan building, sampling logic, the model's module calls),
  operator dispatch, tensors built from Python lists, and the profiler's own bookkeeping per operator
  (which, like dispatch, grows with the number of operators).
* matmul ceiling: the best fp32 GFLOP/s of a 1024 x 1024 x 1024 `torch.mm` at the bench's thread count;
  a step's FLOPs are counted from the model's shapes (`decode_flops_per_token`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# Operators that move no data and do no arithmetic: their whole self time is dispatch (host overhead).
METADATA_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::squeeze", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::narrow", "aten::chunk",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::resize_", "aten::view_as", "aten::expand_as", "aten::numpy_T", "aten::contiguous", "aten::flatten",
    "aten::unflatten", "aten::movedim", "aten::swapaxes", "aten::result_type", "aten::is_nonzero",
    "aten::_local_scalar_dense", "aten::item", "aten::dim", "aten::size", "aten::stride",
})


def matmul_ceiling_gflops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.mm over `repeats` timed runs (after one warm-up)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best / 1e9


def decode_flops_per_token(cfg, context: int) -> float:
    """FLOPs (2 per multiply-add) of one decode token at `context` cached tokens: every projection, the
    absorbed MLA attention over the latent cache, the routed + shared experts (or dense MLP), and the LM head."""
    h, heads, r, dr = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    macs = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.q_lora_rank:
            macs += h * cfg.q_lora_rank + cfg.q_lora_rank * heads * (dn + dr)
        else:
            macs += h * heads * (dn + dr)
        macs += h * (r + dr)                                   # kv_a (latent + rope key)
        macs += heads * dn * r + heads * r * dv                # W_UK into the query, W_UV after attention
        macs += heads * (r + dr) * context + heads * r * context  # scores over the latent cache, weighted sum
        macs += heads * dv * h                                 # o_proj
        if cfg.is_moe_layer(layer):
            active = cfg.num_experts_per_tok + (cfg.n_shared_experts or 0)
            macs += h * cfg.n_routed_experts + active * 3 * h * cfg.moe_intermediate_size
        else:
            macs += 3 * h * cfg.intermediate_size
    macs += h * cfg.vocab_size
    return 2.0 * macs


def _op_call_cost_us() -> float:
    """Median profiler self time of a one-element torch.add: the cost of calling any operator."""
    a, b = torch.ones(1), torch.ones(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(300):
            torch.add(a, b)
    times = [e.self_cpu_time_total for e in prof.events() if e.name == "aten::add"]
    return statistics.median(times) if times else 0.0


def _decoding(engine, batch: int) -> bool:
    return len(engine.running) == batch and not engine.waiting and all(
        len(r.tokens) - r.num_computed <= 1 for r in engine.running)


def profile_decode(make_engine: Callable, add_requests: Callable, batch: int, steps: int) -> dict:
    """Mean decode step of `batch` sequences, split into model compute and host overhead.

    `make_engine()` returns a fresh Engine, `add_requests(engine)` queues the batch (long enough to decode
    `steps` steps). Returns {step_ms, step_cpu_ms, profiled_ms, compute_ms, host_ms, ops_per_step, op_call_us,
    tokens_per_step, steps}."""

    def warm(engine) -> None:
        add_requests(engine)
        for _ in range(10000):
            if _decoding(engine, batch):
                break
            engine.step()
        for _ in range(2):
            engine.step()

    eng = make_engine()
    warm(eng)
    times, cpu, tokens = [], [], 0
    for _ in range(steps):
        if not _decoding(eng, batch):
            break
        t0, c0 = time.perf_counter(), time.process_time()
        outs = eng.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens += sum(len(o.ids) for o in outs)
    if not times:
        raise RuntimeError("no decode step with the whole batch running (too few new tokens?)")
    call_us = _op_call_cost_us()
    eng = make_engine()
    warm(eng)
    n, prof_s = 0, 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(len(times)):
            if not _decoding(eng, batch):
                break
            t0 = time.perf_counter()
            eng.step()
            prof_s += time.perf_counter() - t0
            n += 1
    compute_us, ops = 0.0, 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        ops += 1
        if e.name not in METADATA_OPS:
            compute_us += max(0.0, e.self_cpu_time_total - call_us)
    compute_ms = compute_us / 1e3 / max(1, n)
    profiled_ms = 1e3 * prof_s / max(1, n)
    return {"step_ms": 1e3 * statistics.mean(times), "step_cpu_ms": 1e3 * statistics.mean(cpu),
            "profiled_ms": profiled_ms, "compute_ms": compute_ms,
            "host_ms": profiled_ms - compute_ms, "ops_per_step": ops / max(1, n), "op_call_us": call_us,
            "tokens_per_step": tokens / len(times), "steps": len(times)}
