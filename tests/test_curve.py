"""CurveZMQ with real keys over a real socket (loopback): a listed client is served, an unlisted one, one
without keys and a plain client get nothing; `moerun client` speaks Curve; binding beyond loopback without
Curve warns, naming the risk."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from launchers import ROOT, base_env

from runtime.client import Client


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from runtime.serve.curve import keygen

    d = tmp_path_factory.mktemp("keys")
    out = {name: keygen(str(d / "keys"), name) for name in ("server", "alice", "mallory")}
    listed = d / "authorized"
    listed.mkdir()
    shutil.copy(out["alice"][0], listed)  # only alice's public key
    return out, str(listed)


@pytest.fixture(scope="module")
def server(keys):
    from runtime.model.loading import load_model
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    (k, listed) = keys
    engine = Engine(load_model("builtin:tiny", mtp=False), max_batch=4, max_model_len=64, page_size=8,
                    kv_cache_tokens=256)
    srv = Server(Scheduler(engine), bind="tcp://127.0.0.1:*", curve_secret_key_file=k["server"][1],
                 curve_authorized_dir=listed).start()
    yield srv
    srv.stop()


@pytest.mark.timeout(120)
def test_a_listed_client_is_served(keys, server):
    k, _ = keys
    with Client(server.endpoint, timeout=60, curve_server_key_file=k["server"][0],
                curve_secret_key_file=k["alice"][1]) as c:
        assert c.info()["curve"] is True
        done = c.generate(prompt_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
        assert done["op"] == "done" and len(done["ids"]) == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("who", ["unlisted key", "no key of its own", "no curve"])
def test_other_clients_get_nothing(keys, server, who):
    k, _ = keys
    kw = {"unlisted key": dict(curve_server_key_file=k["server"][0], curve_secret_key_file=k["mallory"][1]),
          "no key of its own": dict(curve_server_key_file=k["server"][0]),
          "no curve": {}}[who]
    with Client(server.endpoint, timeout=3, **kw) as c:
        with pytest.raises(TimeoutError):  # the handshake never completes: no request reaches the server
            c.info()
    assert server.engine.metrics.counters["requests_total"] <= 1  # only alice's generate ever arrived


@pytest.mark.timeout(180)
def test_moerun_client_speaks_curve(keys, server, tmp_path):
    k, _ = keys
    cmd = [sys.executable, "-m", "launch", "client"]
    made = subprocess.run([*cmd, "keygen", "--keys-dir", str(tmp_path), "--name", "bob"], env=base_env(),
                          cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "bob.key").is_file() and (tmp_path / "bob.key_secret").stat().st_mode & 0o077 == 0
    ok = subprocess.run([*cmd, "generate", "--connect", server.endpoint, "--prompt-ids", "1,2,3", "--max-tokens",
                         "3", "--json", "--curve-server-key", k["server"][0], "--curve-secret-key", k["alice"][1]],
                        env=base_env(), cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert '"finish_reason": "length"' in ok.stdout
    bob = str(tmp_path / "bob.key_secret")  # made above, but not listed by the server
    refused = subprocess.run([*cmd, "health", "--connect", server.endpoint, "--timeout", "3",
                              "--curve-server-key", k["server"][0], "--curve-secret-key", bob],
                             env=base_env(), cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert refused.returncode == 1 and "no reply" in refused.stderr


def test_bad_key_files_are_clear_errors(keys, tmp_path):
    from runtime.serve.curve import CurveError, load_keypair, secure_server

    k, listed = keys
    with pytest.raises(CurveError, match="holds only a public key"):
        load_keypair(k["alice"][0])
    with pytest.raises(CurveError, match="does not exist"):
        load_keypair(str(tmp_path / "nope.key_secret"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurveError, match="holds no client public key"):
        secure_server(None, None, k["server"][1], str(tmp_path / "empty"))
    with pytest.raises(CurveError, match="must name a directory"):
        secure_server(None, None, k["server"][1], "")


def test_binding_beyond_loopback_without_curve_warns():
    from runtime.serve.app import bind_warning

    warning = bind_warning("tcp://0.0.0.0:5555", curve=False)
    assert "WARNING" in warning and "unauthenticated" in warning and "serve.curve_secret_key_file" in warning
    assert bind_warning("tcp://0.0.0.0:5555", curve=True) is None
    for local in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x"):
        assert bind_warning(local, curve=False) is None
