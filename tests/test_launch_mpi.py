"""The foundation under real launchers: mpirun (Open MPI), torchrun-style env, failures, concurrency."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.launchers import ROOT, base_env, mpirun, parse_info

pytestmark = pytest.mark.mpi


def leftover_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (our ranks and their launcher)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"MOERUN_TEST_TAG={tag}".encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


# How long the job may take to end after a rank fails, measured from the failure (start-up excluded: on a
# loaded 2-core machine starting 3-4 torch ranks alone can take longer than the whole failure path). The
# failure path is the watchdog's detection (a reported failure at once, a silent rank after
# MOERUN_DEAD_AFTER_S = 3 s), a grace of up to 3 s for the others to read the report, and interpreter exit;
# a rank that hangs in a collective instead never ends (the test's timeout catches that).
END_AFTER_FAILURE_S = 20.0


class TimedProcess:
    """A subprocess whose output lines and exit are time-stamped (time.monotonic), so that a test can time
    from an event in the output instead of from start-up."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import threading

        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str, str]] = []  # (time, "out" / "err", line)
        self.exit_t: float | None = None
        self._pumps = [threading.Thread(target=self._pump, args=(s, n), daemon=True)
                       for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._pumps:
            t.start()

    def _pump(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), name, line))

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.exit_t = time.monotonic()
        for t in self._pumps:
            t.join(timeout=10)
        return rc

    def text(self, name: str) -> str:
        return "".join(line for _, n, line in self.lines if n == name)

    def first(self, needle: str) -> float | None:
        return next((t for t, _, line in self.lines if needle in line), None)


@pytest.mark.timeout(120)
def test_info_under_mpirun_with_emulated_nodes():
    out = mpirun(4, ["info", "--set", "parallel.tp=2"], env=base_env(MOERUN_RANKS_PER_NODE="2"))
    assert out.returncode == 0, out.stderr
    ranks = parse_info(out.stdout)
    assert sorted(ranks) == [0, 1, 2, 3]
    for r, f in ranks.items():
        assert f["world"] == "4" and f["launcher"] == "openmpi" and f["backend"] == "gloo"
        assert f["local_rank"] == str(r % 2) and f["node"] == f"{r // 2}/2"
        assert f"tp:{r % 2}/2" in f["mesh"]


@pytest.mark.timeout(120)
def test_info_local_ranks_from_mpi_split():
    out = mpirun(4, ["info"])
    assert out.returncode == 0, out.stderr
    ranks = parse_info(out.stdout)
    assert {r: (f["local_rank"], f["local_world"], f["node"]) for r, f in ranks.items()} == \
        {r: (str(r), "4", "0/1") for r in range(4)}


API_SCRIPT = """
import cluster, torch, torch.distributed as dist
with cluster.init(tp=2, ep=2) as mesh:
    for dim in ("tp", "pp", "dp", "ep", "edp", "world"):
        t = torch.tensor([float(mesh.rank)], device=mesh.device)
        dist.all_reduce(t, group=mesh.group(dim))
        assert t.item() == sum(mesh.ranks(dim)), (dim, t.item(), mesh.ranks(dim))
        assert mesh.size(dim) == len(mesh.ranks(dim)) and mesh.ranks(dim)[mesh.coord(dim)] == mesh.rank
    print(f"ok rank={mesh.rank} tp={mesh.ranks('tp')} ep={mesh.ranks('ep')} edp={mesh.ranks('edp')}")
"""


@pytest.mark.timeout(120)
def test_python_api_mesh_groups_work():
    out = mpirun(4, [], python_args=["-c", API_SCRIPT])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("ok"))
    assert lines == [
        "ok rank=0 tp=[0, 1] ep=[0, 1] edp=[0, 2]", "ok rank=1 tp=[0, 1] ep=[0, 1] edp=[1, 3]",
        "ok rank=2 tp=[2, 3] ep=[2, 3] edp=[0, 2]", "ok rank=3 tp=[2, 3] ep=[2, 3] edp=[1, 3]",
    ]


@pytest.mark.timeout(90)
def test_fail_rank_drill_stops_the_job_and_names_the_rank():
    """Catches a job that lingers (or hangs) after a rank dies, that exits 0, or that leaves ranks behind."""
    tag = uuid.uuid4().hex
    job = TimedProcess([sys.executable, "-m", "launch", "launch", "-n", "4", "--", "selftest", "--fail-rank", "2",
                        "--size-mb", "0.1"], env=base_env(MOERUN_TEST_TAG=tag))
    rc = job.wait(timeout=80)
    err = job.text("err")
    assert rc != 0
    died = job.first("died: --fail-rank drill")  # rank 2's last words, just before its SIGKILL
    assert died is not None, err[-3000:]
    assert job.exit_t - died < END_AFTER_FAILURE_S, f"the job ended {job.exit_t - died:.1f} s after rank 2 died"
    assert "rank 2" in err and "died" in err
    assert "selftest passed" not in job.text("out")
    assert leftover_pids(tag) == []
    _check_drill_lines_in_docs(err)


def _check_drill_lines_in_docs(stderr: str) -> None:
    """docs/launching.md shows the drill's output: each of its lines starts a line the code printed (HOST is
    the host name, `...` anything; survivors' lines only where one got to print before mpirun killed it)."""
    import re

    text = (ROOT / "docs" / "launching.md").read_text()
    block = re.search(r"<!-- fail-rank-drill -->\n```\n(.*?)```", text, re.S).group(1).splitlines()
    assert block[0] == "$ moerun launch -n 4 -- selftest --fail-rank 2"
    got = [ln.strip() for ln in stderr.splitlines() if ln.startswith("[moerun]")]
    wild = {"HOST": re.escape(socket.gethostname()), "...": ".*", "status 137": r"status \d+"}
    for doc_line in block[1:]:
        survivor = re.match(r"\[moerun\] rank [013]: stopping because ", doc_line)
        parts = re.split(r"(HOST|\.\.\.|status 137|^\[moerun\] rank [013]:)", doc_line)
        pattern = "".join(wild.get(p, r"\[moerun\] rank \d+:" if p.startswith("[moerun] rank") and p.endswith(":")
                                    else re.escape(p)) for p in parts)
        if survivor and not any("stopping because" in g for g in got):
            continue  # mpirun was faster than every survivor's watchdog this time
        assert any(re.match(pattern, g) for g in got), (doc_line, pattern, got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_torchrun_style(world: int, args: list[str], tag: str) -> list[TimedProcess]:
    """What torchrun gives each worker (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without its agent."""
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MOERUN_TEST_TAG=tag,
                       MOERUN_DEAD_AFTER_S="3")
        procs.append(TimedProcess([sys.executable, *args], env))
    return procs


HANG_SCRIPT = """
import os, signal, sys, time, torch, torch.distributed as dist, cluster
with cluster.init() as mesh:
    dist.barrier()
    print("ready", flush=True)
    if mesh.rank == {victim}:
        print("failing now", flush=True)
        {action}
    t = torch.ones(1, device=mesh.device)
    while True:          # the survivors sit in collectives with the victim
        dist.all_reduce(t)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim,action,expect", [
    (1, "raise RuntimeError('boom in the model')", "rank 1 (.*) failed: RuntimeError: boom in the model"),
    (2, "os.kill(os.getpid(), signal.SIGKILL)", "rank 2 stopped responding"),
    (0, "os.kill(os.getpid(), signal.SIGKILL)", "rank 0"),
])
def test_any_rank_failure_stops_all_ranks_without_a_launcher(victim, action, expect):
    """No mpirun to clean up: the health watchdog alone must end the job, naming the rank. Catches survivors
    that hang in the collective, exit 0, blame the wrong rank, or take long after the failure."""
    import re

    tag = uuid.uuid4().hex
    script = HANG_SCRIPT.format(victim=victim, action=action)
    procs = _spawn_torchrun_style(3, ["-c", script], tag)
    codes = [p.wait(timeout=80) for p in procs]
    assert all(c != 0 for c in codes), codes
    failed_at = procs[victim].first("failing now")
    assert failed_at is not None, procs[victim].text("err")[-2000:]
    last_exit = max(p.exit_t for p in procs)
    assert last_exit - failed_at < END_AFTER_FAILURE_S, f"the job ended {last_exit - failed_at:.1f} s after the failure"
    survivors = [p.text("err") for i, p in enumerate(procs) if i != victim]
    for err in survivors:
        assert re.search(expect, err), err[-2000:]
    assert leftover_pids(tag) == []


@pytest.mark.timeout(180)
def test_two_jobs_started_together_both_succeed():
    args = [sys.executable, "-m", "launch", "launch", "-n", "4", "--", "selftest", "--size-mb", "0.05",
            "--iters", "1"]
    jobs = [subprocess.Popen(args, env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    outs = [j.communicate(timeout=170) for j in jobs]
    for j, (stdout, stderr) in zip(jobs, outs):
        assert j.returncode == 0, stderr[-3000:]
        assert "selftest passed" in stdout


@pytest.mark.timeout(120)
def test_selftest_under_torchrun():
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "launch", "selftest",
                          "--size-mb", "0.05", "--iters", "1", "--set", "parallel.tp=2"],
                         env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "selftest passed" in out.stdout and "tp=2" in out.stdout


@pytest.mark.timeout(120)
def test_info_under_torchrun():
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "3", "-m", "launch", "info"],
                         env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = parse_info(out.stdout)
    assert sorted(ranks) == [0, 1, 2], out.stdout + out.stderr[-3000:]
    assert all(f["launcher"] == "torchrun" and f["world"] == "3" and f["local_rank"] == str(r)
               for r, f in ranks.items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_stops_every_rank(sig):
    """scancel / kill / Ctrl-C on `moerun launch`: every rank stops, non-zero exit, nothing left over."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "launch", "-n", "2", "--", "selftest", "--size-mb", "0.01",
         "--iters", "10000000"],
        env=base_env(MOERUN_TEST_TAG=tag), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_as_in_a_terminal)
    try:
        # Wait until the ranks exist (their environment carries the tag), then signal the launcher.
        deadline = time.monotonic() + 60
        while len(leftover_pids(tag)) < 4 and time.monotonic() < deadline:  # launcher + mpirun + 2 ranks
            time.sleep(0.2)
        assert len(leftover_pids(tag)) >= 4, "ranks did not start"
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err[-2000:]
        assert time.monotonic() - t0 < END_AFTER_FAILURE_S  # timed from the signal, not from start-up
        assert signal.Signals(sig).name in err
        deadline = time.monotonic() + 10
        while leftover_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftover_pids(tag) == []
    finally:  # a failed run must not leave a 10-million-iteration job eating the suite's cores
        for pid in leftover_pids(tag):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _as_in_a_terminal() -> None:
    """The launcher's SIGINT and SIGQUIT at their defaults, as for a job started at a terminal (Ctrl-C). A
    suite started as a background job inherits them ignored, and the launcher rightly keeps an inherited
    ignore (as `nohup` and `&` intend), so without this the SIGINT case would test how the suite was run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
