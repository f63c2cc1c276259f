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
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.client import Client  # noqa: E402

DEAD_AFTER_S = 3.0  # MOERUN_DEAD_AFTER_S of the multi-rank drills
CLIENT_TIMEOUT_S = 3.0  # serve.client_timeout_s of the serving drills


# --- processes -----------------------------------------------------------------------------------------
def _env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_", "PRTE_", "MOERUN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    bindir = str(Path(sys.executable).parent)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               PATH=bindir + os.pathsep + env.get("PATH", ""), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MOERUN_CHAOS_TAG=tag, **extra)
    return env


def _tagged(tag: str, rank: int | None = None) -> list[int]:
    """Processes started for this drill (and, with `rank`, that MPI rank's)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MOERUN_CHAOS_TAG={tag}".encode() in env and (
                rank is None or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env):
            found.append(int(d.name))
    return found


def _kill_all(tag: str) -> None:
    for pid in _tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gone(tag: str, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _tagged(tag)


class Job:
    """A `python -m launch ...` process (its stderr collected into a file); `address` once it listens."""

    def __init__(self, args: list[str], tag: str, env: dict[str, str] | None = None, ignore_xfsz: bool = False):
        self.tag = tag
        self.err = tempfile.TemporaryFile("w+")
        pre = (lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)) if ignore_xfsz else None
        self.proc = subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env or _env(tag),
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, preexec_fn=pre)
        self.address = self.pid = None

    def listening(self, timeout_s: float = 180.0) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if "listening on" in line:
                    self.address = line.split("listening on ")[1].split()[0]
                    self.pid = int(line.split("pid=")[1].split()[0])
                    return self
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"no server came up: {self.stderr()[-2000:]}")

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(30) is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def _report(name: str, ok: bool, what: str) -> bool:
    print(f"{name:<16} {'PASS' if ok else 'FAIL'}  {what}", flush=True)
    return ok


# --- kill -9 of a follower mid-stream -------------------------------------------------------------------
def drill_kill9(quick: bool) -> bool:
    tag = uuid.uuid4().hex
    n = 4 if quick else 16
    job = Job(["launch", "-n", "2", "--", "serve", "--bind", "tcp://127.0.0.1:*", "--set", "parallel.ep=2",
               "--set", "serve.kv_cache_tokens=8192", "--set", "serve.page_size=8", "--set", "serve.max_model_len=512"],
              tag, _env(tag, MOERUN_DEAD_AFTER_S=str(DEAD_AFTER_S)))
    ctx = zmq.Context()
    socks = []
    try:
        job.listening()
        for i in range(n):
            s = _dealer(ctx, job.address)
            s.send(msgpack.packb({"op": "generate", "id": f"k{i}", "prompt_ids": [1, 2, 3 + i], "max_tokens": 400,
                                  "stream": True, "ignore_eos": True}))
            socks.append(s)
        for s in socks:  # everybody is generating
            if not s.poll(120_000) or msgpack.unpackb(s.recv())["op"] != "token":
                return _report("kill9-follower", False, "the streams did not start")
        victims = _tagged(tag, rank=1)
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
        clean = _gone(tag)
        errors = [m for m in last.values() if m["op"] == "error"]
        worst = max((m["t"] for m in errors), default=float("nan"))
        ok = bool(victims) and len(errors) == n and code not in (None, 0) and clean
        return _report("kill9-follower", ok, f"{len(errors)}/{n} streaming clients got error within {worst:.1f} s "
                       f"of the SIGKILL; job exit {code} after {t_exit:.1f} s; processes left: "
                       f"{'none' if clean else _tagged(tag)}")
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        _kill_all(tag)


# --- SIGSTOP of a rank mid-training ---------------------------------------------------------------------
def drill_sigstop(quick: bool, victim: int) -> bool:
    tag = uuid.uuid4().hex
    name = f"sigstop-train-r{victim}"
    with tempfile.TemporaryDirectory() as out:
        job = Job(["launch", "-n", "2", "--", "train", "--set", "parallel.ep=2", "--set", "train.steps=100000",
                   "--set", "data.seq_len=16", "--set", "train.global_batch=4", "--set", f"train.out={out}",
                   "--set", "train.resume=false"], tag, _env(tag, MOERUN_DEAD_AFTER_S=str(DEAD_AFTER_S)))
        try:
            metrics = Path(out) / "metrics.jsonl"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and job.proc.poll() is None:
                if metrics.exists() and metrics.read_text().count("\n") >= 2:
                    break
                time.sleep(0.1)
            else:
                return _report(name, False, f"training did not start: {job.stderr()[-1500:]}")
            pids = _tagged(tag, rank=victim)
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            code = job.wait(90)
            elapsed = time.monotonic() - t0
            err = job.stderr()
            named = f"rank {victim} stopped responding" in err or (
                victim == 0 and "rank 0 died, was killed or stopped" in err)
            _kill_all(tag)  # a stopped process ignores everything but SIGKILL
            clean = _gone(tag)
            ok = bool(pids) and named and code not in (None, 0) and clean and elapsed < DEAD_AFTER_S + 15
            return _report(name, ok, f"rank {victim} named after {elapsed:.1f} s (MOERUN_DEAD_AFTER_S="
                           f"{DEAD_AFTER_S:g}); job exit {code}; processes left: {'none' if clean else 'some'}")
        finally:
            _kill_all(tag)


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
            _kill_all(tag)
        saved = latest_checkpoint(out)
        truthful = first["weight_version"] == 1 and "File too large" in first.get("save_error", "")
        once = retry.get("duplicate") is True and retry["weight_version"] == 1 and version == 2
        ref = _reference_state(os.path.join(tmp, "ref"))
        cfg = load_config(None, [*TRAIN_SETS, f"train.out={out}"])
        resumed = Trainer(cfg, resume_from=saved, log=lambda m: None)
        exact = resumed.step == 2 and all(torch.equal(p, ref[n]) for n, p in resumed.model.named_parameters())
        ok = truthful and once and "save_error" not in second and exact and code == 0 and saved.endswith("step-2")
        return _report("disk-full", ok, f"failed save replied trained v1 + save_error={truthful}; retry applied "
                       f"nothing={once}; next save {os.path.basename(saved or '-')}, resumed state equals a run "
                       f"without the failure={exact}")


# --- hostile frames mixed with streaming clients, and vanishing clients ---------------------------------------
def _hostile_frames(vocab: int) -> list[tuple[str, list[bytes], int]]:
    """(kind, frames of one message, replies expected)."""
    p = msgpack.packb
    gen = {"op": "generate", "prompt_ids": [1, 2, 3], "max_tokens": 2}
    rows = [[i % vocab for i in range(4096)]] + [[1, 2]] * 4095
    return [
        ("garbage", [b"\xc1\xc1\xc1"], 1),
        ("not-a-map", [p([1, 2, 3])], 1),
        ("int-keys", [p({1: 2})], 1),
        ("unknown-op", [p({"op": "shutdown", "id": "x"})], 1),
        ("no-id", [p({"op": "generate", "prompt_ids": [1]})], 1),
        ("wrong-type", [p({**gen, "id": "w", "prompt_ids": "abc"})], 1),
        ("out-of-vocab", [p({**gen, "id": "v", "prompt_ids": [10**12]})], 1),
        ("nan-temperature", [p({**gen, "id": "n", "temperature": float("nan")})], 1),
        ("inf-top-p", [p({**gen, "id": "i", "top_p": float("inf")})], 1),
        ("tiny-temperature", [p({**gen, "id": "t", "temperature": 1e-39})], 1),  # served (greedy)
        ("tiny-top-p", [p({**gen, "id": "q", "temperature": 1.0, "top_p": 1e-46})], 1),  # served
        ("top-priority", [p({**gen, "id": "pr", "priority": 2**31 - 1})], 1),
        ("huge-max-tokens", [p({**gen, "id": "m", "max_tokens": 2**31 - 1})], 1),
        ("long-prompt", [p({**gen, "id": "l", "prompt_ids": [1] * 5000})], 1),
        ("foreign-abort", [p({"op": "abort", "id": "s0"})], 1),
        ("train-amplified", [p({"op": "train", "id": "a", "input_ids": rows})], 1),
        ("three-frames", [p({"op": "info"}), p({"op": "info"})], 1),
        ("deep-nesting", [b"\x91" * 100_000 + b"\xc0"], 1),
        ("unknown-field", [p({**gen, "id": "u", "evil": True})], 1),
        ("health", [p({"op": "health"})], 1),
    ]


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0]) // 1024
    return fields["VmRSS"], fields["VmHWM"]


def drill_hostile(job: Job, quick: bool) -> bool:
    n_streams, n_hostile, new = (32, 200, 8) if quick else (256, 2000, 16)
    ctx = zmq.Context()
    socks, hostile = [], []
    try:
        with Client(job.address, timeout=60) as c:
            c.generate(prompt_ids=[1, 2], max_tokens=2)  # warm
            vocab = c.info()["vocab_size"]
        rss0, _ = _rss(job.pid)
        kinds = _hostile_frames(vocab)
        hostile = [_dealer(ctx, job.address) for _ in range(8)]
        expected = [0] * len(hostile)
        plan = [("stream", i) for i in range(n_streams)] + [("hostile", i) for i in range(n_hostile)]
        plan.sort(key=lambda x: (x[1] * 7919) % (n_streams + n_hostile))  # mixed, deterministic
        streams: dict[int, dict] = {}
        for what, i in plan:
            if what == "stream":
                s = _dealer(ctx, job.address)
                s.send(msgpack.packb({"op": "generate", "id": f"s{i}", "prompt_ids": [1 + i % 200, 5, 9],
                                      "max_tokens": new, "stream": True, "ignore_eos": True}))
                socks.append(s)
                streams[i] = {"sock": s, "chunks": [], "done": None}
            else:
                _, frames, replies = kinds[i % len(kinds)]
                h = i % len(hostile)
                hostile[h].send_multipart(frames)
                expected[h] += replies
        # frames beyond the size bounds: one just over the soft bound (answered), one over the hard bound
        # (ZeroMQ drops that connection: no reply, by design)
        soft = _dealer(ctx, job.address)
        soft.send(b"\x00" * ((1 << 20) + 1))
        hard = _dealer(ctx, job.address)
        hard.send(b"\x00" * ((8 << 20) + 8192))
        got = [0] * len(hostile)
        pending = set(streams)
        deadline = time.monotonic() + (120 if quick else 600)
        poller = zmq.Poller()
        for s in [*socks, *hostile]:
            poller.register(s, zmq.POLLIN)
        by_sock = {id(st["sock"]): st for st in streams.values()}
        while (pending or got != expected) and time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                while s.poll(0):
                    msg = msgpack.unpackb(s.recv())
                    st = by_sock.get(id(s))
                    if st is None:
                        got[hostile.index(s)] += 1
                    elif msg["op"] == "token":
                        st["chunks"].extend(msg["ids"])
                    else:
                        st["done"] = msg
                        pending.discard(int(msg["id"][1:]))
        soft_answered = soft.poll(10_000) and msgpack.unpackb(soft.recv())["code"] == "bad_request"
        hard_dropped = not hard.poll(2_000)
        complete = sum(1 for st in streams.values() if st["done"] is not None and st["done"]["op"] == "done"
                       and st["chunks"] == st["done"]["ids"] and len(st["chunks"]) == new)
        rss1, hwm = _rss(job.pid)
        ok = (got == expected and complete == n_streams and soft_answered and hard_dropped
              and hwm - rss0 < 512)
        return _report("hostile", ok, f"{sum(got)}/{sum(expected)} hostile frames answered (+1 over the soft "
                       f"bound answered={bool(soft_answered)}, +1 over the hard bound dropped={hard_dropped}); "
                       f"{complete}/{n_streams} streams got all {new} tokens; server RSS {rss0} -> {rss1} MiB "
                       f"(peak {hwm} MiB)")
    finally:
        for s in [*socks, *hostile]:
            s.close(0)
        ctx.destroy(0)


VANISHING_CLIENT = """
import sys, msgpack, zmq
s = zmq.Context().socket(zmq.DEALER)
s.connect(sys.argv[1])
for i in range(8):
    s.send(msgpack.packb({"op": "generate", "id": f"v{i}", "prompt_ids": [3, 1, 4, 1, 5], "max_tokens": 1500,
                          "stream": True, "ignore_eos": True}))
seen = set()
while len(seen) < 8:
    seen.add(msgpack.unpackb(s.recv())["id"])
print("streaming", flush=True)
sys.stdin.read()
"""


def drill_vanish(job: Job, how: signal.Signals) -> bool:
    name = f"vanish-{how.name.lower()}"
    with Client(job.address, timeout=60) as c:
        base = c.metrics()["metrics"]
        client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, job.address], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=_env("vanish"))
        try:
            if client.stdout.readline().strip() != "streaming":
                return _report(name, False, "the client did not start streaming")
            held = c.metrics()["metrics"]["kv_pages_used"]
            t0 = time.monotonic()
            client.send_signal(how)
            deadline = t0 + 60
            while time.monotonic() < deadline:
                m = c.metrics()["metrics"]
                if m["requests_running"] == 0 and m["kv_pages_used"] == base["kv_pages_used"]:
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
        finally:
            client.kill()
            client.wait()
        aborted = m["requests_aborted_total"] - base["requests_aborted_total"]
        ok = m["requests_running"] == 0 and aborted == 8 and m["kv_pages_used"] == base["kv_pages_used"]
        bound = CLIENT_TIMEOUT_S + 5 if how == signal.SIGSTOP else 5
        ok = ok and elapsed < bound
        return _report(name, ok, f"8 streams of a {how.name}ed client aborted ({aborted}); {held} KV pages back "
                       f"after {elapsed:.1f} s (serve.client_timeout_s={CLIENT_TIMEOUT_S:g})")


def serving_drills(quick: bool, only: set[str]) -> list[bool]:
    tag = uuid.uuid4().hex
    job = Job(["serve", "--bind", "tcp://127.0.0.1:*", "--set", "serve.max_model_len=4096", "--set",
               "serve.kv_cache_tokens=65536", "--set", "serve.page_size=16", "--set",
               f"serve.client_timeout_s={CLIENT_TIMEOUT_S}"], tag)
    try:
        job.listening()
        results = []
        if "hostile" in only:
            results.append(drill_hostile(job, quick))
        if "vanish" in only:
            results.append(drill_vanish(job, signal.SIGKILL))
            results.append(drill_vanish(job, signal.SIGSTOP))
        alive = job.proc.poll() is None
        code = job.stop()
        results.append(_report("server-after", alive and code == 0, f"the server served on through every drill "
                               f"and stopped cleanly (exit {code})"))
        return results
    finally:
        _kill_all(tag)


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
