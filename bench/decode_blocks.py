"""Where a decode step's time goes, block by block, and how much of the experts' part is weight streaming.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_blocks.py [--preset small] [--batch 32] [--runs 3]

Builds bench/serve.py's model (--preset), runs a batch of greedy requests to their decode steps, and per run:

* times decode steps whole and, in the same steps, the model's MLA blocks, MoE blocks and the routed experts'
  grouped SwiGLU inside them (each module's forward wrapped with a timer; ms per step);
* takes one MoE layer's real expert call of such a step (its rows, its tokens per expert) and times it alone,
  warm (its weights in cache from the previous call) and cold (after touching 96 MB of other memory, so its
  weights come from DRAM as they do inside a step, where the step's other weights and KV pass through the
  cache in between).

The gap between warm and cold is the cost of streaming that layer's expert weights; an engine with fewer
operators (or a compiler) does not remove it. Prints the load average with each run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _timer(cls, acc: dict[str, float], key: str):
    orig = cls.forward

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - t0

    cls.forward = forward
    return orig


def _alone_us(fn, iters: int, flush: torch.Tensor | None) -> float:
    """Median microseconds of fn(), each call preceded by a pass over `flush` when given (not timed)."""
    times = []
    for i in range(iters + 3):
        if flush is not None:
            flush.add_(1.0)
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="bench/serve.py's model preset (default small)")
    p.add_argument("--batch", type=int, default=32, help="sequences decoding together (default 32)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per run (default 20)")
    p.add_argument("--runs", type=int, default=3, help="runs, each on a fresh engine (default 3)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from hf_models import make_hf_model
    from serve import PRESETS, hf_config

    import runtime
    import runtime.model.deepseek as ds
    from runtime.serve import Engine, SamplingParams

    s = PRESETS[a.preset]
    cfg = hf_config(**s)
    path, _ = make_hf_model(tempfile.mkdtemp(prefix="moerun-bench-"), "deepseek_v3", seed=0, **cfg)
    model = runtime.load_model(path)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, s["vocab"], (a.batch, a.prompt), generator=g).tolist()
    new = a.steps + 8

    def decoding_engine() -> Engine:
        e = Engine(model, max_batch=a.batch, max_model_len=a.prompt + new + 8, max_prefill_tokens=a.batch * a.prompt,
                   page_size=16, kv_cache_tokens=a.batch * (a.prompt + new + 16))
        for i, pr in enumerate(prompts):
            e.add_request(str(i), pr, SamplingParams(max_tokens=new, ignore_eos=True))
        for _ in range(4):  # prefill, then the first decode steps
            e.step()
        return e

    acc: dict[str, float] = defaultdict(float)
    originals = {cls: _timer(cls, acc, key) for cls, key in
                 ((ds.MLA, "mla"), (ds.MoE, "moe"), (ds.GroupedExperts, "experts"))}
    captured: dict = {}
    timed_experts = ds.GroupedExperts.forward

    def capture(self, rows, tokens_per_expert, weights):
        captured.setdefault("call", (self, rows.clone(), tokens_per_expert.clone(), weights.clone()))
        return timed_experts(self, rows, tokens_per_expert, weights)

    moe_layers = sum(model.config.is_moe_layer(i) for i in range(s["layers"]))
    print(f"preset {a.preset}: hidden {s['hidden']}, {s['layers']} layers ({moe_layers} MoE, {s['experts']} experts "
          f"top-4), {a.batch} sequences decoding, {a.threads} thread(s)")
    flush = torch.ones(24 << 20)  # 96 MB: more than this machine's last-level cache
    for run in range(1, a.runs + 1):
        e = decoding_engine()
        acc.clear()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            e.step()
        step_ms = 1e3 * (time.perf_counter() - t0) / a.steps
        per = {k: 1e3 * v / a.steps for k, v in acc.items()}
        ds.GroupedExperts.forward = capture
        captured.clear()
        e.step()
        ds.GroupedExperts.forward = timed_experts
        mod, rows, tpe, w = captured["call"]
        call = functools.partial(originals[ds.GroupedExperts], mod, rows, tpe, w)
        with torch.no_grad():
            warm = _alone_us(call, 50, None)
            cold = _alone_us(call, 50, flush)
        mb = sum(t.numel() * t.element_size() for t in (mod.gate_proj, mod.up_proj, mod.down_proj)) / 1e6
        print(f"run {run}: step {step_ms:.2f} ms = MLA blocks {per['mla']:.2f} + MoE blocks {per['moe']:.2f} "
              f"(routed experts {per['experts']:.2f}, {per['experts'] / moe_layers:.2f} a layer) + the rest "
              f"{step_ms - per['mla'] - per['moe']:.2f}; one layer's experts alone ({rows.shape[0]} rows, "
              f"{mb:.1f} MB of weights): warm {warm:.0f} us, cold {cold:.0f} us; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
