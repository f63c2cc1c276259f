"""moerun under real Slurm: srun, sbatch scripts from `moerun slurm`, and mpirun inside a batch job.

The cluster is two emulated nodes (n1, n2) on this host (tests/slurm_cluster.py). The node names do not
resolve: the scripts of `moerun slurm` find rank 0's address themselves (Slurm's NodeAddr of the batch host,
127.0.0.1 here), so those jobs are submitted without `MOERUN_MASTER_ADDR`; plain `srun` jobs get
`MOERUN_MASTER_ADDR=127.0.0.1`, and one test checks that without it the job fails at once with a message
naming the address. Without slurm-wlm/munge (or root for the daemons) these skip; under CI=true they
fail instead (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, mpirun_argv, parse_info, slurm_cluster, venv_bin  # noqa: F401

JOB_ENV = {"MOERUN_MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _job_env(master_addr: bool = True) -> dict[str, str]:
    # The venv's bin first, so the job's mpirun / moerun are this install's.
    env = dict(JOB_ENV, PATH=f"{Path(venv_bin('python')).parent}:{os.environ.get('PATH', '')}")
    if not master_addr:
        env.pop("MOERUN_MASTER_ADDR")
    return env


def _names_do_not_resolve() -> None:
    for name in ("n1", "n2"):
        try:
            socket.getaddrinfo(name, None)
            pytest.skip(f"the name {name} resolves on this machine")
        except socket.gaierror:
            pass


def submit_and_wait(cluster: SlurmCluster, script: Path, deadline_s: float = 180,
                    master_addr: bool = True) -> tuple[str, str, str]:
    """sbatch `script` (with MOERUN_MASTER_ADDR=127.0.0.1 in the environment it exports to the job unless
    `master_addr` is false) and poll scontrol until the job ends; return (JobState, ExitCode, job id)."""
    r = cluster.run(["sbatch", "--parsable", str(script)], env=_job_env(master_addr), cwd=script.parent,
                    timeout=60)
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit(), r.stdout
    deadline = time.monotonic() + deadline_s
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=30).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        if fields.get("JobState") in TERMINAL:
            return fields["JobState"], fields.get("ExitCode", "?"), job_id
        time.sleep(0.5)
    cluster.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {deadline_s}s\n{cluster.logs()}")


def write_sbatch(where: Path, name: str, *command: str) -> Path:
    """`moerun slurm --nodes 2 --ntasks-per-node 2 COMMAND` run in `where`; its stdout saved as `name`."""
    argv = [venv_bin("moerun"), "slurm", "--nodes", "2", "--ntasks-per-node", "2", "--time", "5", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOERUN_"))}
    gen = subprocess.run(argv, capture_output=True, text=True, cwd=where, timeout=60, env=env)
    assert gen.returncode == 0, gen.stderr
    script = where / name
    script.write_text(gen.stdout)
    return script


def check_two_by_two(rows: list[dict], launcher: str) -> None:
    """Four ranks, two per node, ranks 0-1 on node 0 and 2-3 on node 1 (Slurm's block distribution)."""
    assert [r["rank"] for r in rows] == [0, 1, 2, 3], rows
    assert all(r["world"] == 4 and r["nodes"] == 2 and r["local_world"] == 2 for r in rows), rows
    assert all(r["launcher"] == launcher for r in rows), rows
    for node in (0, 1):
        on_node = [r for r in rows if r["node"] == node]
        assert sorted(r["local_rank"] for r in on_node) == [0, 1], rows
        assert sorted(r["rank"] for r in on_node) == [2 * node, 2 * node + 1], rows


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_srun_info_two_nodes(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    """`info` needs no rendezvous: each rank reads Slurm's variables (launcher precedence ends at Slurm)."""
    argv = ["srun", "-N", "2", "-n", "4", venv_bin("moerun"), "info"]
    r = slurm_cluster.run(argv, env=JOB_ENV, timeout=150)
    rows = parse_info(r.stdout)
    check_two_by_two(rows, "slurm")


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_srun_unresolvable_master_is_a_clear_error(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    """selftest rendezvous: rank 0's host is `n1` (first of SLURM_STEP_NODELIST), which does not resolve."""
    _names_do_not_resolve()
    r = slurm_cluster.run(["srun", "-N", "2", "-n", "2", venv_bin("moerun"), "selftest"], check=False,
                          env={"OMP_NUM_THREADS": "1"}, timeout=150)
    assert r.returncode != 0
    assert "'n1'" in r.stderr and "does not resolve" in r.stderr, r.stderr


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_sbatch_selftest_from_moerun_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    """The config file reaches every rank (absolute path): its tp=2 shows in rank 0's summary line. Node
    names n1, n2 do not resolve and nothing sets MOERUN_MASTER_ADDR: the script exports the batch host's
    address (Slurm's NodeAddr, 127.0.0.1). The pass-through #SBATCH options are taken by real sbatch."""
    _names_do_not_resolve()
    (tmp_path / "job.toml").write_text("[parallel]\ntp = 2\n")
    script = write_sbatch(tmp_path, "selftest.sbatch", "job.toml", "--partition", "test", "--account", "acct",
                          "--cpus-per-task", "1", "--mem", "100M", "--exclusive", "--sbatch", "comment=moerun-test",
                          "--", "selftest")
    state, code, job_id = submit_and_wait(slurm_cluster, script, master_addr=False)
    out_file = tmp_path / f"moerun-selftest-{job_id}.out"
    output = out_file.read_text() if out_file.exists() else f"(no {out_file.name})"
    assert (state, code) == ("COMPLETED", "0:0"), f"{state} {code}\n{output}\n{slurm_cluster.logs()}"
    assert f"moerun: job {job_id} on 2 node(s): n[1-2]" in output, output
    assert "moerun: rank 0 on n1, rendezvous address 127.0.0.1" in output, output
    assert "selftest passed" in output and "on 4 ranks" in output and "tp=2" in output, output
    out = slurm_cluster.run(["scontrol", "show", "job", "-o", job_id]).stdout
    job = dict(f.split("=", 1) for f in out.split() if "=" in f)
    assert job["Partition"] == "test" and job["TimeLimit"] == "00:05:00" and job["Comment"] == "moerun-test", job
    assert job["OverSubscribe"] == "NO" and job["MinMemoryNode"] == "100M" and job["Account"] == "acct", job


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_sbatch_failing_rank_fails_the_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    """--kill-on-bad-exit=1 in the script: one dead rank ends the step, and the job is FAILED."""
    script = write_sbatch(tmp_path, "fail.sbatch", "--", "selftest", "--fail-rank", "3")
    state, code, job_id = submit_and_wait(slurm_cluster, script, master_addr=False)
    output = (tmp_path / f"moerun-selftest-{job_id}.out").read_text()
    assert state == "FAILED" and code != "0:0", f"{state} {code}\n{output}"
    assert "rank 3" in output, output
    assert "selftest passed" not in output, output


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_mpirun_inside_sbatch_beats_inherited_slurm_vars(slurm_cluster: SlurmCluster,  # noqa: F811
                                                         tmp_path: Path) -> None:
    """mpirun in a batch job: every rank inherits the batch step's SLURM_PROCID=0; Open MPI's must win."""
    script = tmp_path / "mpi.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=1 --ntasks-per-node=2 --output={tmp_path}/mpi-%j.out\n"
        'echo "batch step: SLURM_PROCID=$SLURM_PROCID SLURM_NTASKS=$SLURM_NTASKS"\n'
        f"{' '.join(mpirun_argv(4))} {venv_bin('moerun')} info\n"
    )
    state, code, job_id = submit_and_wait(slurm_cluster, script)
    output = (tmp_path / f"mpi-{job_id}.out").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), f"{state} {code}\n{output}"
    assert "batch step: SLURM_PROCID=0 SLURM_NTASKS=2" in output, output  # the trap is really there
    rows = parse_info(output)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3], output
    assert all(r["world"] == 4 and r["launcher"] == "openmpi" for r in rows), output
    assert sorted(r["local_rank"] for r in rows) == [0, 1, 2, 3] and all(r["node"] == 0 for r in rows), output


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_mpirun_with_inherited_slurm_env_no_cluster() -> None:
    """The same trap without Slurm installed: each rank gets a batch step's SLURM_* (PROCID=0, NTASKS=1)."""
    inherited = {
        "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
        "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1",
        "SLURM_STEP_NODELIST": "node01", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1",
    }
    # Set per rank (through `env`), as mpirun's own launch must not see a fake allocation.
    argv = [*mpirun_argv(4), "env", *(f"{k}={v}" for k, v in inherited.items()), venv_bin("moerun"), "info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=dict(env, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = parse_info(r.stdout)
    assert [row["rank"] for row in rows] == [0, 1, 2, 3], r.stdout
    assert all(row["world"] == 4 and row["launcher"] == "openmpi" for row in rows), r.stdout
    assert sorted(row["local_rank"] for row in rows) == [0, 1, 2, 3], r.stdout


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_srun_mpi_pmi2_placement(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    """`srun --mpi=pmi2`: MPICH-style PMI variables, with the placement only in Slurm's variables.

    The ranks' real environments are captured (no torch start-up per rank) and read by RankInfo here, as
    `moerun info` would read them once mpi4py (an Open MPI build) has failed to join the PMI-2 job.
    """
    from cluster.env import RankInfo

    dump = (f"import json, os; open('{tmp_path}/env.' + os.environ['SLURM_PROCID'], 'w')"
            ".write(json.dumps(dict(os.environ)))")
    slurm_cluster.run(["srun", "--mpi=pmi2", "-N", "2", "-n", "4", venv_bin("python"), "-c", dump], timeout=120)
    envs = [json.loads((tmp_path / f"env.{r}").read_text()) for r in range(4)]
    assert all("PMI_RANK" in e and "PMI_SIZE" in e for e in envs), "srun --mpi=pmi2 set no PMI variables"
    rows = []
    for env in envs:
        info = RankInfo.from_env(env, use_mpi=False)
        rows.append({"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank,
                     "local_world": info.local_world_size, "node": info.node_rank, "nodes": info.num_nodes,
                     "launcher": info.launcher})
    check_two_by_two(sorted(rows, key=lambda r: r["rank"]), "mpich")
