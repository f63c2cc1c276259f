"""The suite's CI rule (tests/conftest.py): under CI=true a skipped `slurm` / `mpi` test fails, with the
skip's reason; outside CI it stays a skip; other skips and expected failures are untouched."""

from __future__ import annotations

import pytest

from tests.conftest import MUST_RUN_IN_CI
from tests.launchers import ROOT

SKIPPING = """
import pytest

@pytest.fixture
def launcher():
    pytest.skip("no daemons here")

@pytest.mark.slurm
def test_slurm_fixture_skip(launcher):
    pass

@pytest.mark.mpi
@pytest.mark.skipif(True, reason="mpirun not installed")
def test_mpi_skipif():
    pass

@pytest.mark.mpi
def test_mpi_skip_inside():
    pytest.skip("mpiexec missing")

def test_plain_skip():
    pytest.skip("optional dependency missing")

@pytest.mark.mpi
@pytest.mark.xfail(strict=True, reason="known bug")
def test_mpi_xfail():
    assert False
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ci", ["true", ""])
def test_skipped_launcher_tests_fail_only_in_ci(pytester, monkeypatch, ci):
    """Catches: the hook not installed (a skipped Slurm test leaves CI green), or one that also fails
    ordinary skips / expected failures."""
    assert MUST_RUN_IN_CI == ("slurm", "mpi")
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
                          "import pytest\n"
                          "def pytest_configure(config):\n"
                          "    config.addinivalue_line('markers', 'slurm: x')\n"
                          "    config.addinivalue_line('markers', 'mpi: x')\n")
    pytester.makepyfile(test_launchers=SKIPPING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    text = result.stdout.str()
    if ci:
        result.assert_outcomes(failed=1, errors=2, skipped=1, xfailed=1)  # setup skips show as errors
        for reason in ("no daemons here", "mpirun not installed", "mpiexec missing"):
            assert "must run in CI but was skipped" in text and reason in text, text
        assert result.ret != 0
    else:
        result.assert_outcomes(skipped=4, xfailed=1)
        assert result.ret == 0
