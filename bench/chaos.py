"""Chaos drills against real jobs: killed and stopped ranks, a full disk, hostile frames, vanishing clients.

    .venv/bin/python bench/chaos.py            # the full drills (a few minutes on a 2-core machine)
    .venv/bin/python bench/chaos.py --quick    # the short version that `make test` runs (tests/test_chaos.py)
    .venv/bin/python bench/chaos.py --only hostile vanish

Every drill starts real processes (`moerun serve`, `moerun launch -n 2 -- ...` through mpirun) on builtin:tiny,
talks to them over real ZeroMQ sockets on loopback, and prints one line: PASS or FAIL, what was checked, and
the figures. The exit status is 0 when every drill passed.

  kill9-follower   `moerun serve` on 2 ranks (ep=2); clients stream; rank 1 gets SIGKILL. Every client gets an
                   `error` within N s, the job exits non-zero, no process is left.
  sigstop-train    `moerun train` on 2 ranks; SIGSTOP to rank 1 (full run: also to rank 0, the store's host)
                   mid-training. The stopped rank is named within N s and the job exits non-zero.
  disk-full        `moerun serve --train` saving every step; the file-size limit of the server process (set
                   from outside with prlimit: writes fail with EFBIG as on a full disk) makes one save fail.
                   The op's reply says the update applied and the save failed, its retry applies nothing, and
                   the next saved checkpoint equals, tensor for tensor, a run without the failure (exact resume).
  hostile          `moerun serve`: hostile frames (bad msgpack, wrong types, NaN and underflowing sampling
                   parameters, top priority, foreign aborts, amplified train ops, oversized frames, ...) mixed
                   with streaming clients. Every hostile frame is answered or its connection dropped by the size
                   limit, every stream gets all its tokens, the server's RSS stays bounded (printed).
  vanish           the same server; a client process streaming long requests is killed (SIGKILL), then another
                   one stopped (SIGSTOP: found by ZMTP heartbeats). Its pages come back within N s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chaos_procs import Job, dealer, gone, job_env, kill_all, report, tagged  # noqa: E402
from chaos_serving import serving_drills  # noqa: E402

from runtime.client import Client  # noqa: E402

# MOERUN_DEAD_AFTER_S of the multi-rank drills (3 s once took a CPU-starved healthy rank for stopped, at load 8-10)
DEAD_AFTER_S = 5.0


# --- kill -9 of a follower mid-stream -------------------------------------------------------------------
def drill_kill9(quick: bool) -> bool:
    tag = uuid.uuid4().hex
    n = 4 if quick else 16
    job = Job(["launch", "-n", "2", "--", "serve", "--bind", "tcp://127.0.0.1:*", "--set", "parallel.ep=2",
               "--set", "serve.kv_cache_tokens=8192", "--set", "serve.page_size=8", "--set", "serve.max_model_len=512"],
              tag, job_env(tag, MOERUN_DEAD_AFTER_S=str(DEAD_AFTER_S)))
    ctx = zmq.Context()
    socks = []
    try:
        job.listening()
        for i in range(n):
            s = dealer(ctx, job.address)
            s.send(msgpack.packb({"op": "generate", "id": f"k{i}", "prompt_ids": [1, 2, 3 + i], "max_tokens": 400,
                                  "stream": True, "ignore_eos": True}))
            socks.append(s)
        for s in socks:  # everybody is generating
            if not s.poll(120_000) or msgpack.unpackb(s.recv())["op"] != "token":
                return report("kill9-follower", False, "the streams did not start")
        victims = tagged(tag, rank=1)
        t0 = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        last: dict[int, dict] = {}
        deadline = t0 + 60
        while len(last) < n and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                while i not in last and s.poll(0):
                    msg = msgpack.unpackb(s.recv())
                    if msg["op"] != "token":
                        last[i] = dict(msg, t=time.monotonic() - t0)
            time.sleep(0.01)
        code = job.wait(60)
        t_exit = time.monotonic() - t0
        clean = gone(tag)
        errors = [m for m in last.values() if m["op"] == "error"]
        worst = max((m["t"] for m in errors), default=float("nan"))
        ok = bool(victims) and len(errors) == n and code not in (None, 0) and clean
        return report("kill9-follower", ok, f"{len(errors)}/{n} streaming clients got error within {worst:.1f} s "
                       f"of the SIGKILL; job exit {code} after {t_exit:.1f} s; processes left: "
                       f"{'none' if clean else tagged(tag)}")
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        kill_all(tag)


# --- SIGSTOP of a rank mid-training ---------------------------------------------------------------------
def drill_sigstop(quick: bool, victim: int) -> bool:
    tag = uuid.uuid4().hex
    name = f"sigstop-train-r{victim}"
    with tempfile.TemporaryDirectory() as out:
        job = Job(["launch", "-n", "2", "--", "train", "--set", "parallel.ep=2", "--set", "train.steps=100000",
                   "--set", "data.seq_len=16", "--set", "train.global_batch=4", "--set", f"train.out={out}",
                   "--set", "train.resume=false"], tag, job_env(tag, MOERUN_DEAD_AFTER_S=str(DEAD_AFTER_S)))
        try:
            metrics = Path(out) / "metrics.jsonl"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and job.proc.poll() is None:
                if metrics.exists() and metrics.read_text().count("\n") >= 2:
                    break
                time.sleep(0.1)
            else:
                return report(name, False, f"training did not start: {job.stderr()[-1500:]}")
            pids = tagged(tag, rank=victim)
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            code = job.wait(90)
            elapsed = time.monotonic() - t0
            want = f"rank {victim} stopped responding" if victim else "rank 0 died, was killed or stopped"
            said = [ln for ln in job.stderr().splitlines() if want in ln]
            kill_all(tag)  # a stopped process ignores everything but SIGKILL
            clean = gone(tag)
            ok = bool(pids) and bool(said) and code not in (None, 0) and clean and elapsed < DEAD_AFTER_S + 15
            what = said[0].split("because ", 1)[-1][:70] if said else "not named"
            return report(name, ok, f"job ended {elapsed:.1f} s after the SIGSTOP (MOERUN_DEAD_AFTER_S="
                          f"{DEAD_AFTER_S:g}), saying \"{what}...\"; exit {code}; processes left: "
                          f"{'none' if clean else 'some'}")
        finally:
            kill_all(tag)


# --- disk full during a save ----------------------------------------------------------------------------
TRAIN_SETS = ["train.steps=0", "train.save_every=1", "train.lr=3e-3", "train.warmup_steps=0",
              "train.mtp_loss_coef=0.0", "train.aux_loss_coef=0.0", "train.bias_update_rate=0.0",
              "data.seq_len=16", "train.global_batch=4", "train.resume=false", "serve.kv_cache_tokens=512",
              "serve.page_size=8", "serve.max_model_len=128"]
OPS = {"t1": [[(7 * i + j) % 250 + 1 for j in range(12)] for i in range(4)],
       "t2": [[(11 * i + 3 * j) % 250 + 1 for j in range(10)] for i in range(4)]}


def _reference_state(out: str) -> dict:
    """The same two ops applied once each, without any failure, in this process."""
    import torch

    from runtime.jobconfig import load_config
    from runtime.sched.rl import RLBatch
    from runtime.sched.scheduler import Kind, Scheduler
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, [*TRAIN_SETS, f"train.out={out}"])
    trainer = Trainer(cfg, log=lambda m: None)
    sv = cfg["serve"]
    work = TrainWork(trainer)
    sched = Scheduler(Engine(trainer.model, max_model_len=sv["max_model_len"], page_size=sv["page_size"],
                             kv_cache_tokens=sv["kv_cache_tokens"]), work)
    for rows in OPS.values():
        work.submit(RLBatch.from_lists(rows))
        while sched.step()[0] != Kind.IDLE:
            pass
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def drill_disk_full(quick: bool) -> bool:
    import torch

    from runtime.jobconfig import load_config
    from runtime.train.checkpoint import latest_checkpoint
    from runtime.train.trainer import Trainer

    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        sets = [x for kv in [*TRAIN_SETS, f"train.out={out}"] for x in ("--set", kv)]
        job = Job(["serve", "--train", "--bind", "tcp://127.0.0.1:*", *sets], tag, ignore_xfsz=True)
        try:
            job.listening()
            hard = resource.prlimit(job.pid, resource.RLIMIT_FSIZE)[1]
            resource.prlimit(job.pid, resource.RLIMIT_FSIZE, (64 << 10, hard))  # "the disk is full"
            with Client(job.address, timeout=120) as c:
                first = c.request("train", id="t1", input_ids=OPS["t1"])
                retry = c.request("train", id="t1", input_ids=OPS["t1"])
                resource.prlimit(job.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
                second = c.request("train", id="t2", input_ids=OPS["t2"])
                version = c.metrics()["metrics"]["weight_version"]
            code = job.stop()
        finally:
            kill_all(tag)
        saved = latest_checkpoint(out)
        truthful = first["weight_version"] == 1 and "File too large" in first.get("save_error", "")
        once = retry.get("duplicate") is True and retry["weight_version"] == 1 and version == 2
        ref = _reference_state(os.path.join(tmp, "ref"))
        cfg = load_config(None, [*TRAIN_SETS, f"train.out={out}"])
        resumed = Trainer(cfg, resume_from=saved, log=lambda m: None)
        exact = resumed.step == 2 and all(torch.equal(p, ref[n]) for n, p in resumed.model.named_parameters())
        ok = truthful and once and "save_error" not in second and exact and code == 0 and saved.endswith("step-2")
        return report("disk-full", ok, f"failed save replied trained v1 + save_error={truthful}; retry applied "
                       f"nothing={once}; next save {os.path.basename(saved or '-')}, resumed state equals a run "
                       f"without the failure={exact}")


DRILLS = ("kill9", "sigstop", "disk", "hostile", "vanish")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short version (fewer clients and frames)")
    ap.add_argument("--only", nargs="+", choices=DRILLS, default=list(DRILLS))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still cleans up its processes
    only = set(a.only)
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    print(f"chaos drills ({'quick' if a.quick else 'full'}) on {os.cpu_count()} cores, load average {load:.1f}",
          flush=True)
    results = []
    if only & {"hostile", "vanish"}:
        results += serving_drills(a.quick, only)
    if "disk" in only:
        results.append(drill_disk_full(a.quick))
    if "kill9" in only:
        results.append(drill_kill9(a.quick))
    if "sigstop" in only:
        for victim in ((1,) if a.quick else (1, 0)):
            results.append(drill_sigstop(a.quick, victim))
    print(json.dumps({"passed": sum(results), "drills": len(results), "seconds": round(time.monotonic() - t0, 1),
                      "load_average_end": round(os.getloadavg()[0], 1)}), flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
