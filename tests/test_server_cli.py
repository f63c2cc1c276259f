"""`moerun serve` and `moerun client` as processes: port 0, text prompt with streaming, health, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _moerun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=timeout)


@pytest.mark.timeout(240)
def test_serve_and_client_commands():
    srv = subprocess.Popen(
        [sys.executable, "-m", "launch", "serve", "--model", "builtin:tiny", "--bind", "tcp://127.0.0.1:*",
         "--set", "serve.kv_cache_tokens=4096", "--set", "serve.page_size=16", "--set", "serve.max_model_len=512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
    )
    try:
        line = srv.stdout.readline()
        assert "listening on tcp://127.0.0.1:" in line, line + srv.stderr.read()
        addr = line.split("listening on ")[1].split()[0]
        assert not addr.endswith(":*") and "tokenizer=yes" in line
        gen = _moerun("client", "generate", "--connect", addr, "--prompt", "Hello", "--max-tokens", "8",
                      "--ignore-eos", "--stream", "--json")
        assert gen.returncode == 0, gen.stderr
        msgs = [json.loads(x) for x in gen.stdout.splitlines()]
        assert [m["op"] for m in msgs] == ["token"] * 8 + ["done"]
        assert [m["ids"][0] for m in msgs[:-1]] == msgs[-1]["ids"]
        assert msgs[-1]["usage"]["prompt_tokens"] == 6  # BOS + 5 bytes
        plain = _moerun("client", "generate", "--connect", addr, "--prompt-ids", "1,2,3", "--max-tokens", "3")
        assert plain.returncode == 0 and plain.stdout.startswith("["), plain.stderr
        health = _moerun("client", "health", "--connect", addr)
        assert health.returncode == 0 and json.loads(health.stdout)["ok"] is True
        info = json.loads(_moerun("client", "info", "--connect", addr).stdout)
        assert info["model"] == "builtin:tiny" and info["kv_cache"]["page_size"] == 16
        prom = _moerun("client", "metrics", "--connect", addr, "--prometheus").stdout
        assert "moerun_generation_tokens_total 11" in prom  # 8 + 3; the health check is counted apart
        assert "moerun_health_checks_total 1" in prom
        bad = _moerun("client", "abort", "--connect", addr, "--id", "nope")
        assert "bad_request" in bad.stderr and bad.returncode == 1
    finally:
        srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=60)
    assert srv.returncode == 0, err
    assert "stopped" in out
