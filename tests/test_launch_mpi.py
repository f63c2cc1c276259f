"""The foundation under real launchers: mpirun (Open MPI), torchrun-style env, failures, concurrency."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.launchers import ROOT, base_env, moerun, mpirun, parse_info

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
    tag = uuid.uuid4().hex
    t0 = time.monotonic()
    out = moerun(["launch", "-n", "4", "--", "selftest", "--fail-rank", "2", "--size-mb", "0.1"],
                 env=base_env(MOERUN_TEST_TAG=tag), timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "rank 2" in out.stderr and "died" in out.stderr
    assert "selftest passed" not in out.stdout
    assert leftover_pids(tag) == []
    _check_drill_lines_in_docs(out.stderr)


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


def _spawn_torchrun_style(world: int, args: list[str], tag: str) -> list[subprocess.Popen]:
    """What torchrun gives each worker (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without its agent."""
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MOERUN_TEST_TAG=tag,
                       MOERUN_DEAD_AFTER_S="3")
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


HANG_SCRIPT = """
import os, signal, sys, time, torch, torch.distributed as dist, cluster
with cluster.init() as mesh:
    dist.barrier()
    print("ready", flush=True)
    if mesh.rank == {victim}:
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
    """No mpirun to clean up: the health watchdog alone must end the job, naming the rank."""
    import re

    tag = uuid.uuid4().hex
    script = HANG_SCRIPT.format(victim=victim, action=action)
    procs = _spawn_torchrun_style(3, ["-c", script], tag)
    t0 = time.monotonic()
    results = [p.communicate(timeout=60) for p in procs]
    elapsed = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), codes
    assert elapsed < 30, f"took {elapsed:.1f} s"
    survivors = [err for i, (_, err) in enumerate(results) if i != victim]
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
    assert sorted(ranks) == [0, 1, 2]
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
        env=base_env(MOERUN_TEST_TAG=tag), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until the ranks exist (their environment carries the tag), then signal the launcher.
    deadline = time.monotonic() + 60
    while len(leftover_pids(tag)) < 4 and time.monotonic() < deadline:  # launcher + mpirun + 2 ranks
        time.sleep(0.2)
    assert len(leftover_pids(tag)) >= 4, "ranks did not start"
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert time.monotonic() - t0 < 30
    assert signal.Signals(sig).name in err
    deadline = time.monotonic() + 10
    while leftover_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover_pids(tag) == []
