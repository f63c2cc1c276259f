"""`moerun serve --train` from the command line: serving answers while the job trains the same weights."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.launchers import ROOT, base_env


@pytest.mark.timeout(180)
def test_serve_train_cli(tmp_path):
    from runtime.client import Client

    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "serve", "--train", "--bind", "tcp://127.0.0.1:*",
         "--set", "train.steps=2", "--set", "data.seq_len=32", "--set", "train.global_batch=4",
         "--set", f"train.out={tmp_path / 'run'}", "--set", "train.resume=false"],
        env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (\S+) pid=\d+ .* training: policy serve_first, 2 job steps", line)
        assert m, line + proc.stderr.read()
        client = Client(m.group(1))
        deadline = time.monotonic() + 120
        version = 0
        while version < 2 and time.monotonic() < deadline:  # the 2 job steps finish while we poll
            version = client.metrics()["metrics"]["weight_version"]
            time.sleep(0.2)
        assert version == 2
        done = client.generate(prompt_ids=[1, 2, 3], max_tokens=4)
        assert done["finish_reason"] == "length" and len(done["ids"]) == 4
        assert done["weight_versions"] == [2] * 4
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"step"') == 2
