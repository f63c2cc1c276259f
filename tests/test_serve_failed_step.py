"""A step that fails on the driver of a multi-rank job ends the job, for plain serving and `--train` alike
(the other ranks may be inside the step's collectives: going on would desynchronise them): every client with
a request in flight gets an `error` naming the failure, every rank exits non-zero naming rank 0, and no
process is left. Real mpirun, 2 ranks (ep=2)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runtime.client import Client
from tests.launchers import base_env, mpirun_path
from tests.test_launch_mpi import leftover_pids

SCRIPT = str(Path(__file__).resolve().parent / "serve_fail_job.py")
pytestmark = pytest.mark.mpi


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["serve", "train"])
def test_a_failed_step_on_the_driver_ends_the_job(mode, tmp_path):
    exe = mpirun_path()
    if exe is None:
        pytest.skip("mpirun not found")
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([exe, "-np", "2", "--oversubscribe", "--allow-run-as-root", sys.executable, SCRIPT, mode,
                             str(tmp_path / "run")], env=base_env(MOERUN_TEST_TAG=tag, MOERUN_DEAD_AFTER_S="5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        addr = line.split("listening on ")[1].split()[0]
        last = []
        with Client(addr, timeout=60) as a, Client(addr, timeout=60) as b:
            rids = [c.submit(prompt_ids=[1, 2, 3], max_tokens=60, ignore_eos=True, stream=True) for c in (a, b)]
            for c, rid in zip((a, b), rids):
                while (msg := c.recv(rid))["op"] == "token":
                    pass
                last.append(msg)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for msg in last:
        assert msg["op"] == "error" and msg["code"] == "internal", msg
        assert "injected failure in the driver's step" in msg["message"]
    assert proc.returncode != 0
    assert "rank 0 (" in err and "injected failure in the driver's step" in err, err[-3000:]
    assert "stopped" not in out  # not a clean stop
    assert leftover_pids(tag) == []
