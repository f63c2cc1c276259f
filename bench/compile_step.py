"""Does `torch.compile` of the bucketed decode step pay on this machine? Eager against compiled, same step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compile_step.py [--preset small] [--batch 32] [--dynamic]

Builds bench/serve.py's model (--preset), runs a batch of requests to their first decode steps, then times
the fixed-shape decode step of runtime/serve/graphs.py (the CUDA-graph path's step, here without capture)
eagerly and under `torch.compile` (inductor). The grouped expert GEMM is registered as an opaque custom op so
that the graph has no break (inductor has no fp32 meta function for `torch._grouped_mm`). Prints the compile
time, the step's CPU time (min and median of --iters, process CPU time, so machine load inflates it less
than wall time) for both, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="bench/serve.py's model preset (default small)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (one graph for all buckets)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import ops.moe

    @torch.library.custom_op("moerun_bench::grouped_linear", mutates_args=())
    def grouped_linear(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @grouped_linear.register_fake
    def _(x, w, tokens_per_expert):
        return x.new_empty(x.shape[0], w.shape[1])

    ops.moe.grouped_linear = lambda x, w, tpe, force_loop=False: grouped_linear(x, w, tpe)

    from hf_models import make_hf_model
    from serve import PRESETS, hf_config

    import runtime
    from runtime.serve import Engine, SamplingParams
    from runtime.serve.graphs import DecodeGraphs

    s = PRESETS[a.preset]
    cfg = hf_config(**s)
    path, _ = make_hf_model(tempfile.mkdtemp(prefix="moerun-bench-"), "deepseek_v3", seed=0, max_shard_size="50MB",
                            **cfg)
    model = runtime.load_model(path)
    prompts = torch.randint(0, s["vocab"], (a.batch, 64), generator=torch.Generator().manual_seed(0)).tolist()
    eng = Engine(model, max_batch=a.batch, max_model_len=200, page_size=16, kv_cache_tokens=a.batch * 150)
    for i, q in enumerate(prompts):
        eng.add_request(str(i), q, SamplingParams(max_tokens=64, ignore_eos=True))
    plans = []
    eng.plan_hook = plans.append
    for _ in range(3):
        eng.step()
    plan = plans[-1]
    step = DecodeGraphs(model, eng.cache, a.batch, 200, capture=False)

    def timed() -> tuple[float, float]:
        ts = []
        for _ in range(a.iters):
            t0 = time.process_time()
            step.run(plan)
            ts.append(time.process_time() - t0)
        return 1e3 * min(ts), 1e3 * statistics.median(ts)

    with torch.no_grad():
        ref = step.run(plan).clone()
        eager = timed()
        t0, c0 = time.perf_counter(), time.process_time()
        step._forward = torch.compile(step._forward, dynamic=a.dynamic)
        out = step.run(plan)
        compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
        compiled = timed()
    print(f"model preset {a.preset}, {a.batch} sequences, torch threads {a.threads}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"eager decode step:    CPU min {eager[0]:.2f} ms  median {eager[1]:.2f} ms")
    print(f"compiled decode step: CPU min {compiled[0]:.2f} ms  median {compiled[1]:.2f} ms   (compile: "
          f"{compile_s:.0f} s wall, {compile_cpu:.0f} s CPU in this process; max logit difference "
          f"{float((out - ref).abs().max()):.1e})")
    print(f"compiled / eager (median): {compiled[1] / eager[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
