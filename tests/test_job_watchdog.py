"""The job's own defences: the rendezvous store listens only where the ranks reach it, an outsider who
reaches it cannot stop the job, and a hung (alive but stuck) rank is named within MOERUN_DEAD_AFTER_S plus
a few seconds, by the rank that hangs, not by the one that waited."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import pytest

from tests.launchers import ROOT, base_env, mpirun, mpirun_path
from tests.test_launch_mpi import leftover_pids

pytestmark = pytest.mark.mpi


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reaches(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def test_store_bind_address_rules():
    from cluster.rendezvous import store_bind_address

    assert store_bind_address("127.0.0.1", 1) == ("127.0.0.1", None)
    assert store_bind_address("localhost", 1)[0] in ("127.0.0.1", "::1")
    ip, why = store_bind_address("127.0.0.1", 2)  # a name that is loopback here cannot serve other hosts
    assert ip == "" and "spans 2 hosts" in why
    ip, why = store_bind_address("192.0.2.1", 2)  # TEST-NET-1: never an address of this host
    assert ip == "" and "not an address of this host" in why


@pytest.mark.timeout(60)
def test_the_store_of_a_one_host_job_listens_on_loopback_only():
    from cluster.env import RankInfo
    from cluster.rendezvous import rendezvous

    port = _free_port()
    info = RankInfo(0, 2, 0, 2, 0, 1, socket.gethostname(), "torchrun")
    store, ep = rendezvous(info, 10, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert (ep.addr, ep.port) == ("127.0.0.1", port)
    assert _reaches("127.0.0.1", port)
    assert not _reaches("127.0.0.2", port)  # another address of this host (any other interface alike)
    del store


MPI_BIND = """
import socket, cluster
from cluster.env import RankInfo
from cluster.rendezvous import rendezvous
info = RankInfo.from_env()
store, ep = rendezvous(info, 30)
if info.rank == 0:
    for host in ("127.0.0.1", "127.0.0.2"):
        try:
            socket.create_connection((host, ep.port), timeout=5).close()
            print("REACHED", host, flush=True)
        except OSError:
            print("REFUSED", host, flush=True)
store.set(f"r{info.rank}", "1"); store.wait(["r0", "r1"])
"""


@pytest.mark.timeout(120)
def test_the_store_under_mpirun_listens_on_loopback_only():
    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    out = mpirun(2, [], python_args=["-c", MPI_BIND], timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REACHED 127.0.0.1" in out.stdout and "REFUSED 127.0.0.2" in out.stdout, out.stdout


JOB = """
import os, sys, time, torch, torch.distributed as dist, cluster
with cluster.init() as mesh:
    dist.barrier()
    print("ready", flush=True)
    sys.stdin.readline()  # the test has attacked the store
    t0, go = time.monotonic(), torch.ones(1, device=mesh.device)
    while go.item():  # rank 0 decides when ten watchdog rounds have passed
        mesh.tick()
        go.fill_(time.monotonic() - t0 < 10 * float(os.environ["MOERUN_HEARTBEAT_S"]))
        dist.broadcast(go, src=0)
    print("survived", flush=True)
"""


def _spawn(world: int, script: str, tag: str, **env: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for r in range(world):
        e = base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MOERUN_TEST_TAG=tag, MOERUN_HEARTBEAT_S="0.2",
                     **env)
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=e, cwd=ROOT, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    procs[0].port = int(port)
    return procs


@pytest.mark.timeout(120)
def test_an_outsider_who_reaches_the_store_cannot_stop_the_job():
    from torch.distributed import TCPStore

    tag = uuid.uuid4().hex
    procs = _spawn(2, JOB, tag)
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        outsider = TCPStore("127.0.0.1", procs[0].port, is_master=False, wait_for_workers=False,
                            timeout=timedelta(seconds=10))
        for key in ("moerun/hb/0", "moerun/hb/1", "moerun/progress/0", "moerun/progress/1"):
            outsider.set(key, "1 1 b|" + "0" * 32)  # forged heartbeats / progress: ignored, not taken for news
        outsider.add("moerun/nfail", 1)  # what stopped the job before: two keys
        outsider.set("moerun/failmsg", "an outsider says stop")
        for n in range(1, 4):  # and failure reports in the current format, unsigned
            outsider.set(f"moerun/fail/{n}", "an outsider says stop|" + "0" * 32)
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "survived" in out, err[-2000:]
        assert "outsider" not in err
    assert leftover_pids(tag) == []


HUNG = """
import time, torch, torch.distributed as dist, cluster
with cluster.init() as mesh:
    dist.barrier()
    t = torch.ones(1, device=mesh.device)
    for i in range(10**9):
        mesh.tick()
        if mesh.rank == {victim} and i == 50:
            time.sleep(3600)  # alive (its watchdog thread beats on) but stuck, as in a hung kernel
        dist.all_reduce(t)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim,collective_timeout", [(2, "300"), (0, "300"), (1, "2")])
def test_a_hung_rank_is_named_quickly_by_itself_not_by_who_waited(victim, collective_timeout):
    """With a collective timeout shorter than MOERUN_DEAD_AFTER_S too: the ranks whose collectives time out
    wait for the verdict, which names the hung rank, not them."""
    tag = uuid.uuid4().hex
    procs = _spawn(3, HUNG.format(victim=victim), tag, MOERUN_DEAD_AFTER_S="3", MOERUN_TIMEOUT_S=collective_timeout)
    t0 = time.monotonic()
    try:
        results = [p.communicate(timeout=90) for p in procs]  # before: the 300 s collective timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"hung rank {victim} named after {time.monotonic() - t0:.1f} s")
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    for r, (_, err) in enumerate(results):
        assert f"rank {victim} is hung: alive, but no progress" in err, err[-2000:]
        assert "failed" not in err or r == victim  # nobody blames the ranks that waited
    assert leftover_pids(tag) == []


STOPPED = """
import os, signal, torch, torch.distributed as dist, cluster
with cluster.init() as mesh:
    dist.barrier()
    t = torch.ones(1, device=mesh.device)
    for i in range(10**9):
        mesh.tick()
        if mesh.rank == 0 and i == 50:
            os.kill(os.getpid(), signal.SIGSTOP)  # the store's host stops: its store answers nobody
        dist.all_reduce(t)
"""


@pytest.mark.timeout(120)
def test_a_stopped_rank_0_is_named_although_its_store_is_frozen():
    import signal

    tag = uuid.uuid4().hex
    procs = _spawn(2, STOPPED, tag, MOERUN_DEAD_AFTER_S="3")
    try:
        _, err = procs[1].communicate(timeout=90)  # before: blocked for good in a store operation
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()
    assert procs[1].returncode != 0
    assert "has not answered for" in err and "rank 0 died, was killed or stopped" in err, err[-2000:]
    assert leftover_pids(tag) == []
