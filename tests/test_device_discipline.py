"""The device-discipline test mode (cluster/devicecheck.py, MOERUN_CHECK_DEVICES=1) under real mpirun: the
collectives of a correct job pass, and a host tensor handed to a device group is caught with its call site,
by a collective and by a p2p post (both transports), while the same job without the mode runs through on
gloo, which is exactly the bug the mode exists for."""

from __future__ import annotations

import pytest
from launchers import base_env, mpirun, mpirun_path

JOB = ["tests/device_discipline_job.py"]


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_device_discipline_catches_a_host_tensor_on_a_device_group() -> None:
    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    ok = mpirun(2, [], python_args=JOB, timeout=120)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert ok.stdout.count(" OK") == 2 and "MOERUN_CHECK_DEVICES=1" in ok.stderr  # the mode was on
    unchecked = mpirun(2, [], env=base_env(MOERUN_CHECK_DEVICES="0"), python_args=[*JOB, "bad"], timeout=120)
    assert unchecked.returncode == 0, (unchecked.stdout + unchecked.stderr)[-3000:]  # gloo forgives it
    for how, env in (("bad", base_env()), ("bad-p2p", base_env(MOERUN_P2P="nccl-emulated"))):
        bad = mpirun(2, [], env=env, python_args=[*JOB, how], timeout=120)
        out = bad.stdout + bad.stderr
        assert bad.returncode != 0, out[-3000:]
        assert "DeviceDisciplineError" in out and "a host tensor (made without device=)" in out, out[-3000:]
        assert "device_discipline_job.py:" in out, out[-3000:]  # the call site is named
