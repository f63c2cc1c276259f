"""Processes for the chaos drills (bench/chaos.py): start `python -m launch ...` tagged, find, kill, report."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent


def job_env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_", "PRTE_", "MOERUN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    bindir = str(Path(sys.executable).parent)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               PATH=bindir + os.pathsep + env.get("PATH", ""), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", MOERUN_CHAOS_TAG=tag, **extra)
    return env


def tagged(tag: str, rank: int | None = None) -> list[int]:
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


def kill_all(tag: str) -> None:
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone(tag: str, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not tagged(tag)


class Job:
    """A `python -m launch ...` process (its stderr collected into a file); `address` once it listens."""

    def __init__(self, args: list[str], tag: str, env: dict[str, str] | None = None, ignore_xfsz: bool = False):
        self.tag = tag
        self.err = tempfile.TemporaryFile("w+")
        pre = (lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)) if ignore_xfsz else None
        self.proc = subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env or job_env(tag),
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


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def report(name: str, ok: bool, what: str) -> bool:
    print(f"{name:<16} {'PASS' if ok else 'FAIL'}  {what}", flush=True)
    return ok
