"""Serving latency while training runs on the same ranks and weights (the shared scheduler's promise).

One process: builtin:tiny (or --model) trained by the [train]/[data] job and served by the server over
ZeroMQ on loopback, both on one copy of the weights. A client sends streamed requests one after another
with a short pause (an open gap the trainer can fill) and measures time to first token (TTFT):
  1. idle: no training job;
  2. under training: the job runs in every gap the policy allows (serve_first by default).
Printed: p50/p90 TTFT of both phases and their ratio, training optimizer steps/s and tokens/s during phase 2,
and the time the scheduler spent per kind of step. Under serve_first a request arriving during a training
step waits for that step to end (preemption at step boundaries); a micro-step's forward and backward are
separate steps (scheduler.split_backward), so TTFT grows by at most one half micro-step or one optimizer
step: smaller micro-batches (--microbatches) trade training throughput for latency.

  python bench/serve_while_training.py [--requests 40] [--policy serve_first] [--microbatches 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build(a):
    from runtime.jobconfig import load_config
    from runtime.sched.scheduler import Scheduler, SchedulerConfig
    from runtime.sched.weights import WeightVersions
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.serve.server import Server
    from runtime.train.trainer import Trainer

    cfg = load_config(None, [
        f"model.path={a.model}", f"train.steps={10**6}", "train.lr=1e-3", "train.mtp_loss_coef=0.0",
        f"train.global_batch={a.global_batch}", f"data.seq_len={a.seq_len}", f"parallel.microbatches={a.microbatches}",
        f"train.out={tempfile.mkdtemp(prefix='swt_')}",
    ])
    trainer = Trainer(cfg)
    engine = Engine(trainer.model, max_batch=16, max_model_len=256, max_prefill_tokens=256, page_size=16,
                    kv_cache_tokens=4096)
    work = TrainWork(trainer, job_steps=0)
    sched = Scheduler(engine, work, SchedulerConfig(a.policy, a.share, a.max_train_microsteps),
                      WeightVersions(engine))
    return Server(sched, bind="tcp://127.0.0.1:*").start(), work, sched


def _ttfts(client, n: int, prompt_len: int, max_tokens: int, gap_s: float) -> list[float]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(256) for _ in range(prompt_len)]
        t0 = time.perf_counter()
        for msg in client.stream(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True):
            if msg["op"] == "token" and len(out) < n and t0 is not None:
                out.append(time.perf_counter() - t0)
                t0 = None
        time.sleep(gap_s)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="pause between requests")
    ap.add_argument("--policy", default="serve_first", choices=("serve_first", "time_share", "train_first"))
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--max-train-microsteps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=8)
    a = ap.parse_args(argv)

    from runtime.client import Client

    srv, work, sched = _build(a)
    try:
        with Client(srv.endpoint, timeout=120) as c:
            _ttfts(c, 3, a.prompt_len, a.max_tokens, 0.0)  # warm-up
            idle = _ttfts(c, a.requests, a.prompt_len, a.max_tokens, a.gap_ms / 1000)
            steps0, tok0, t0 = work.trainer.step, work.tokens_total, time.perf_counter()
            work.job_left = 10**6  # start the training job
            busy = _ttfts(c, a.requests, a.prompt_len, a.max_tokens, a.gap_ms / 1000)
            dt = time.perf_counter() - t0
            steps, toks = work.trainer.step - steps0, work.tokens_total - tok0
            work.job_left = 0
            m = c.metrics()["metrics"]
    finally:
        srv.stop()
    p50i, p50b = statistics.median(idle), statistics.median(busy)
    print(f"policy {a.policy}: {a.requests} streamed requests per phase, prompt {a.prompt_len} tokens, "
          f"{a.max_tokens} new; training micro-batch {a.global_batch // a.microbatches} x {a.seq_len} tokens")
    print(f"TTFT idle:           p50 {p50i * 1e3:7.2f} ms   p90 {_pct(idle, 0.9) * 1e3:7.2f} ms")
    print(f"TTFT under training: p50 {p50b * 1e3:7.2f} ms   p90 {_pct(busy, 0.9) * 1e3:7.2f} ms   "
          f"(p50 ratio {p50b / p50i:.2f}x)")
    print(f"training during phase 2: {steps} optimizer steps in {dt:.2f} s = {steps / dt:.2f} steps/s, "
          f"{toks / dt:.0f} tokens/s, weight version {m['weight_version']}")
    kinds = ("serve", "train_micro", "train_bwd", "optim")
    print("scheduler time per kind of step: " + ", ".join(
        f"{k} {m[f'scheduler_{k}_steps']} steps {m[f'scheduler_{k}_seconds']:.2f} s" for k in kinds))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
