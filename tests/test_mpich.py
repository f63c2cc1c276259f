"""`moerun info` under MPICH's mpiexec (Hydra), which speaks PMI (PMI_RANK, MPI_LOCALRANKID), not Open MPI.

MPICH comes from PyPI's `mpich` wheel, which `make venv` installs into a small venv of its own,
`.venv/mpich` (its mpiexec and libmpi would clash with Open MPI's in .venv/bin); the ranks run the
project's own interpreter. Without it these tests skip with the reason, and under CI=true fail
(tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import parse_info


def mpich_mpiexec() -> Path:
    """Hydra's mpiexec from `make venv`'s .venv/mpich; pytest.skip with the reason if it is not there."""
    mpiexec = Path(sys.prefix) / "mpich" / "bin" / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"MPICH's mpiexec not found at {mpiexec} (`make venv` installs PyPI mpich there)")
    return mpiexec


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_info_under_mpich_mpiexec() -> None:
    mpiexec = mpich_mpiexec()
    version = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True, timeout=30)
    assert "HYDRA" in version.stdout.upper(), version.stdout + version.stderr  # really MPICH's launcher
    foreign = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "PRTE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
    env.update(OMP_NUM_THREADS="1")
    argv = [str(mpiexec), "-n", "4", os.path.abspath(sys.executable), "-m", "launch", "info"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = parse_info(r.stdout)
    assert [row["rank"] for row in rows] == [0, 1, 2, 3], r.stdout
    assert all(row["world"] == 4 and row["launcher"] == "mpich" for row in rows), r.stdout
    # One host: Hydra's MPI_LOCALRANKID / MPI_LOCALNRANKS say all four share node 0.
    assert sorted(row["local_rank"] for row in rows) == [0, 1, 2, 3], r.stdout
    assert all(row["local_world"] == 4 and row["node"] == 0 and row["nodes"] == 1 for row in rows), r.stdout


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_selftest_under_mpich_with_master_env() -> None:
    """mpi4py (an Open MPI build) cannot join an MPICH job: rendezvous then goes by MASTER_ADDR/PORT."""
    mpiexec = mpich_mpiexec()
    with socket.socket() as s:  # a port free now; the test's own choice, never a fixed number
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    foreign = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "PRTE_", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    argv = [str(mpiexec), "-n", "2", os.path.abspath(sys.executable), "-m", "launch", "selftest"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selftest passed" in r.stdout and "on 2 ranks" in r.stdout, r.stdout
