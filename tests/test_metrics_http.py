"""`serve.metrics_bind`: Prometheus scrapes `/metrics` over HTTP (runtime/serve/metrics_http.py), parsed here
by prometheus_client's own parser; health checks are counted apart from traffic."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.launchers import ROOT, base_env


def _scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.headers["Content-Type"], r.read().decode()


@pytest.mark.timeout(240)
def test_prometheus_endpoint_types_help_and_health_apart(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from runtime.client import Client

    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "serve", "--train", "--bind", "tcp://127.0.0.1:*",
         "--set", "serve.metrics_bind=127.0.0.1:0", "--set", "train.steps=0", "--set", "data.seq_len=32",
         "--set", "train.global_batch=4", "--set", f"train.out={tmp_path / 'run'}", "--set", "train.resume=false"],
        env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (\S+) .* metrics=(http://127\.0\.0\.1:\d+/metrics)", line)
        assert m, line + proc.stderr.read()
        with Client(m.group(1), timeout=120) as c:
            for _ in range(3):
                assert len(c.generate(prompt_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)["ids"]) == 4
            for _ in range(5):
                assert c.health()["ok"]
            assert c.request("train", input_ids=[[5, 6, 7, 8, 9, 10]])["op"] == "trained"
            zmq_map = c.metrics()["metrics"]
        ctype, text = _scrape(m.group(2))
        with pytest.raises(urllib.error.HTTPError) as err:
            _scrape(m.group(2).replace("/metrics", "/other"))
        assert err.value.code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, errs[-2000:]
    assert ctype.startswith("text/plain; version=0.0.4")

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for f in families.values():
        assert f.documentation and f.documentation != f.name.replace("_", " "), f"{f.name} has no # HELP"
        if any(s.name.endswith("_total") for s in f.samples):
            assert f.type == "counter", f"{f.name} is a running total typed {f.type}"
    for name in ("requests", "generation_tokens", "prompt_tokens", "health_checks", "steps",
                 "scheduler_serve_steps", "scheduler_optim_steps", "scheduler_serve_seconds", "train_tokens",
                 "train_optimizer_steps"):
        assert families[f"moerun_{name}"].type == "counter", name
    for name in ("requests_running", "kv_cache_usage", "weight_version", "kv_pages_capacity"):
        assert families[f"moerun_{name}"].type == "gauge", name

    def value(sample: str) -> float:
        return next(s.value for f in families.values() for s in f.samples if s.name == sample)

    # traffic: 3 generate requests of 3 prompt tokens and 4 new tokens; the 5 health checks are apart
    assert value("moerun_requests_total") == 3 == zmq_map["requests_total"]
    assert value("moerun_generation_tokens_total") == 12 == zmq_map["generation_tokens_total"]
    assert value("moerun_prompt_tokens_total") == 9
    assert value("moerun_time_to_first_token_seconds_count") == 3
    assert value("moerun_e2e_latency_seconds_count") == 3
    assert value("moerun_inter_token_latency_seconds_count") == 9
    assert value("moerun_health_checks_total") == 5 == zmq_map["health_checks_total"]
    assert value("moerun_train_optimizer_steps_total") == 1 and value("moerun_weight_version") == 1
    assert value("moerun_train_tokens_total") > 0


def test_metrics_bind_is_checked_before_loading():
    out = subprocess.run([sys.executable, "-m", "launch", "serve", "--set", "serve.metrics_bind=localhost"],
                         env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "HOST:PORT" in out.stderr, out.stderr
