"""docs/architecture.md's list of the files a `generate` request runs code in is the measured list:
tools/request_path.py traces one request through a real server (ZeroMQ on loopback) and the project files
it records outside ops/ must be exactly the files the document numbers, so neither can drift alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.launchers import ROOT, base_env


def _documented() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The path of a generate request", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `([\w/]+\.py)`", section, re.MULTILINE)


@pytest.mark.timeout(180)
def test_architecture_doc_lists_the_traced_request_path() -> None:
    res = subprocess.run([sys.executable, "tools/request_path.py", "--json"], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    traced = json.loads(res.stdout)
    assert "runtime/serve/server.py" in traced and "parallel/expert.py" in traced, traced  # the trace saw the path
    outside_ops = sorted(f for f in traced if not f.startswith("ops/"))
    documented = _documented()
    assert len(documented) == len(set(documented)), documented
    assert sorted(documented) == outside_ops, (
        f"docs/architecture.md lists {sorted(documented)}; the trace ran code in {outside_ops}")
