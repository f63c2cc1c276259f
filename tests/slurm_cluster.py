"""A throw-away two-node Slurm cluster on loopback, for tests of `srun` / `sbatch` launches.

One munged (own key and socket), one slurmctld and two slurmd (`slurmd -N n1`, `-N n2`) run as emulated
nodes on 127.0.0.1, each on a port chosen free at start, with every state, spool, log and pid file in a
temporary directory and `SLURM_CONF` pointing at a generated slurm.conf. Nothing on the host's own Slurm or
munge setup is read or changed. The pytest fixture `slurm_cluster` skips, with the reason and the daemon
logs' tails, when slurm-wlm / munge are missing or the daemons cannot start here; under CI=true that skip
is a failure (tests/conftest.py), since CI installs Slurm (.ci/install-slurm.sh).

Run it by hand to poke at the cluster: `python tests/slurm_cluster.py` starts it, prints the environment
to export, and stops it on Enter / Ctrl-C.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
START_DEADLINE_S = 60.0
DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "squeue", "scontrol")


INFO_RE = re.compile(
    r"rank=(?P<rank>\d+) world=(?P<world>\d+) local_rank=(?P<local_rank>\d+) "
    r"local_world=(?P<local_world>\d+) node=(?P<node>\d+)/(?P<nodes>\d+) "
    r"host=(?P<host>\S+) launcher=(?P<launcher>\S+)"
)


def parse_info(text: str) -> list[dict]:
    """The `moerun info` lines in `text` (one per rank), as dicts with int fields, sorted by rank."""
    rows = []
    for m in INFO_RE.finditer(text):
        row: dict = {k: (v if k in ("host", "launcher") else int(v)) for k, v in m.groupdict().items()}
        rows.append(row)
    return sorted(rows, key=lambda r: r["rank"])


def venv_bin(name: str) -> str:
    """Absolute path of a console script of the interpreter running the tests (not resolved: venv)."""
    return str(Path(os.path.abspath(sys.executable)).parent / name)


def mpirun_argv(np: int) -> list[str]:
    """Open MPI's mpirun for `np` local ranks, with the flags root and a 2-core machine need."""
    exe = venv_bin("mpirun")
    if not os.path.exists(exe):
        exe = shutil.which("mpirun") or "mpirun"
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [exe, *flags, "-np", str(np)]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not installed, or the daemons did not come up); the message says why."""


def _free_port() -> int:
    # Port 0 asks the kernel; the daemons bind it a moment later (tiny race, acceptable in a test rig).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  ({path.name}: no log)"
    return "\n".join(f"  {path.name}: {line}" for line in text[-lines:]) or f"  ({path.name}: empty)"


class SlurmCluster:
    """The running daemons: `env` is the environment for srun/sbatch/sinfo; `stop()` kills them by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        # Variables of an enclosing Slurm job or MPI launcher would confuse the clients and the ranks.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_")):
                del self.env[key]
        self.env["SLURM_CONF"] = str(self.conf)
        self.nodes = list(NODES)

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise SlurmUnavailable(
                f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge; .ci/run does that)"
            )
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle()

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - kept open for the daemon
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, start_new_session=True,
        )
        out.close()

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
        )
        self._poll(lambda: self.munge_socket.exists(), "munged to create its socket")

    def _write_conf(self) -> None:
        user = getpass.getuser()
        host = socket.gethostname().split(".")[0]
        r = self.root
        ports = {n: _free_port() for n in self.nodes}
        lines = [
            "# Generated by tests/slurm_cluster.py: two emulated nodes on loopback, no cgroups.",
            "ClusterName=moeruntest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # The host has fewer cores than the two emulated nodes claim: trust the config, not the probe.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",
            "UsePAM=0",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[node]} "
                f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def _poll(self, ok, what: str, deadline_s: float = START_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        delay = 0.05
        while not ok():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out after {deadline_s:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            try:
                r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10, check=False)
            except subprocess.TimeoutExpired:
                return False
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in self.nodes)

        self._poll(idle, f"sinfo to show {', '.join(self.nodes)} idle")

    # ---------------------------------------------------------------- use
    def run(
        self, argv: list[str], timeout: float = 60, check: bool = True, env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        full_env = dict(self.env, **(env or {}))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}\n"
                + self.logs()
            )
        return r

    def logs(self, lines: int = 25) -> str:
        files = sorted((self.root / "log").glob("*"))
        return "daemon logs (tail):\n" + "\n".join(_tail(f, lines) for f in files)

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        # Jobs a failed test left behind first (their slurmstepd would outlive slurmd), then compute
        # daemons, the controller, and munge; each daemon by its own PID.
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


    def _cancel_all_jobs(self, deadline_s: float = 20.0) -> None:
        try:
            jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=10, check=False).stdout.split()
            if not jobs:
                return
            self.run(["scancel", *jobs], timeout=10, check=False)
            deadline = time.monotonic() + deadline_s
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h", "-o", "%i"], timeout=10, check=False).stdout.split():
                    return
                time.sleep(0.2)
        except (OSError, subprocess.TimeoutExpired):
            pass


def start_cluster(root: Path) -> SlurmCluster:
    """Start the cluster under `root`; on failure stop what started and raise SlurmUnavailable."""
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except OSError as e:  # a daemon that cannot be executed, a directory that cannot be made
        cluster.stop()
        raise SlurmUnavailable(f"cannot start the daemons: {e}\n{cluster.logs()}") from e
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide two-node loopback cluster; skipped with the reason when Slurm cannot run here (a
    failure under CI=true)."""
    # A short path: munge's and slurm's socket paths must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="moerun-slurm-"))
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as e:
        # Straight to the real stderr (not captured): CI logs then show why, with the daemons' log tails.
        print(f"\n[slurm_cluster] real Slurm unavailable, Slurm tests skip: {e}", file=sys.__stderr__,
              flush=True)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"real Slurm unavailable: {str(e).splitlines()[0]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("MOERUN_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    where = Path(tempfile.mkdtemp(prefix="moerun-slurm-"))
    c = start_cluster(where)
    print(f"cluster up in {where}\nexport SLURM_CONF={c.conf}\n(Enter or Ctrl-C stops it)")
    try:
        input()
    except (KeyboardInterrupt, EOFError):
        pass
    finally:
        c.stop()
