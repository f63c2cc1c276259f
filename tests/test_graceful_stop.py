"""SIGTERM / SIGINT stop `moerun serve --train` and `moerun train` gracefully (runtime/stopping.py): the step
in flight ends, what waits is answered `unavailable`, updates not yet saved are checkpointed, the last line
says "stopped", the exit code is 0, and a restart with train.resume continues from there. Real processes,
real ZeroMQ, real mpirun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launchers import ROOT, base_env, mpirun_path

PROMPT = [1, 2, 3, 4, 5]
TRAIN_ROWS = [[7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27]]


def _serve_train(out: Path, *, np_: int = 1, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, int]:
    """`moerun serve --train` (under `mpirun -np N` when N > 1) with no job steps; (process, address, pid of
    the process owning the socket)."""
    args = ["-m", "launch", "serve", "--train", "--bind", "tcp://127.0.0.1:*", "--set", "train.steps=0",
            "--set", "data.seq_len=32", "--set", "train.global_batch=4", "--set", f"train.out={out}",
            "--set", "train.lr=0.01", *extra]
    cmd = [sys.executable, *args]
    if np_ > 1:
        cmd = [mpirun_path(), "-np", str(np_), "--oversubscribe", "--allow-run-as-root", *cmd]
    proc = subprocess.Popen(cmd, env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    line = ""
    while "listening on" not in line:  # a resumed run prints "resumed from ..." first
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(proc.stderr.read()[-3000:])
    m = re.search(r"listening on (\S+) pid=(\d+) ", line)
    assert m, line
    return proc, m.group(1), int(m.group(2))


def _stop(proc: subprocess.Popen, pid: int, sig: int = signal.SIGTERM) -> tuple[str, str]:
    os.kill(pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _greedy(c) -> dict:
    return c.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True, logprobs=1)


@pytest.mark.timeout(300)
def test_serve_train_updates_survive_sigterm_and_resume(tmp_path):
    from runtime.client import Client

    out = tmp_path / "run"
    proc, addr, pid = _serve_train(out)
    try:
        with Client(addr, timeout=120) as c:
            before = _greedy(c)
            for _ in range(2):
                assert c.request("train", input_ids=TRAIN_ROWS)["op"] == "trained"
            trained = _greedy(c)
            assert trained["weight_version"] == 2 and trained["logprobs"] != before["logprobs"]
            rid = c.submit(prompt_ids=PROMPT, max_tokens=2000, ignore_eos=True, stream=True)
            assert c.recv(rid)["op"] == "token"  # in flight when the signal comes
            stdout, _ = _stop(proc, pid)
            reply = c.recv(rid)
            while reply["op"] == "token":
                reply = c.recv(rid)
            assert reply["op"] == "error" and reply["code"] == "unavailable", reply
            assert "stopping (SIGTERM)" in reply["message"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"moerun serve: stopped \(SIGTERM\) at weight_version 2; 1 waiting request\(s\) answered "
                        r"unavailable; saved checkpoint \S+step-2 \(step 2\)", last), last
    assert (out / "ckpt" / "latest").read_text().strip() == "step-2"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # the restart continues: same weights, same weight version; a `save` op with nothing new still writes
    proc, addr, pid = _serve_train(out)
    try:
        with Client(addr, timeout=120) as c:
            assert c.info()["weight_version"] == 2
            again = _greedy(c)
            saved = c.save()
        assert again["ids"] == trained["ids"] and again["logprobs"] == trained["logprobs"]
        assert again["weight_versions"] == [2] * 6
        assert saved["op"] == "saved" and saved["step"] == 2 and saved["weight_version"] == 2
        assert saved["path"].endswith("step-2") and os.path.isdir(saved["path"])
        stdout, _ = _stop(proc, pid, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert stdout.strip().splitlines()[-1].endswith("no update since the last checkpoint, nothing to save")


@pytest.mark.timeout(120)
def test_save_op_writes_a_checkpoint_on_demand(tmp_path):
    """`save` mid-run: the checkpoint holds the update applied so far and the weight version."""
    from runtime.client import Client
    from runtime.train.checkpoint import read_manifest

    proc, addr, pid = _serve_train(tmp_path / "run")
    try:
        with Client(addr, timeout=120) as c:
            c.request("train", input_ids=TRAIN_ROWS)
            saved = c.save()
        manifest = read_manifest(saved["path"])
        assert saved["step"] == 1 and manifest["data"]["next_step"] == 1
        assert manifest["serving"] == {"weight_version": 1}
        stdout, _ = _stop(proc, pid)
        assert stdout.strip().splitlines()[-1].endswith("nothing to save")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_plain_server_refuses_save():
    from runtime import load_model
    from runtime.client import Client, ServerError
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    engine = Engine(load_model("builtin:tiny"), max_batch=2, max_model_len=64, page_size=8, kv_cache_tokens=128)
    srv = Server(Scheduler(engine), bind="tcp://127.0.0.1:*").start()
    try:
        with Client(srv.endpoint, timeout=30) as c, pytest.raises(ServerError) as err:
            c.save()
        assert err.value.code == "bad_request" and "does not train" in err.value.message
    finally:
        srv.stop()


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_multi_rank_serve_train_stops_together_and_resumes(tmp_path):
    """`mpirun -np 2 moerun serve --train` with ep = 2: SIGTERM to rank 0's pid (the other rank ignores
    signals and leaves on rank 0's STOP) after a `train` op: both ranks save their experts and exit 0
    together; the checkpoint, resumed by one process, serves the same tokens at the same weight version."""
    from runtime.client import Client

    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    out = tmp_path / "run"
    proc, addr, pid = _serve_train(out, np_=2, extra=("--set", "parallel.ep=2"))
    try:
        with Client(addr, timeout=120) as c:
            assert c.request("train", input_ids=TRAIN_ROWS)["weight_version"] == 1
            trained = _greedy(c)
        stdout, _ = _stop(proc, pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert re.search(r"moerun serve: stopped \(SIGTERM\) at weight_version 1; .*saved checkpoint \S+step-1 ",
                     stdout), stdout[-2000:]
    proc, addr, pid = _serve_train(out)
    try:
        with Client(addr, timeout=120) as c:
            again = _greedy(c)
        _stop(proc, pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert again["weight_versions"] == [1] * 6 and again["ids"] == trained["ids"]
    assert max(abs(a - b) for a, b in zip(again["logprobs"], trained["logprobs"])) < 1e-4


def _wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} steps not written; exit {proc.poll()}")


@pytest.mark.timeout(240)
def test_train_sigterm_saves_and_resume_continues(tmp_path):
    """`moerun train` on one rank: the run stops after a step, saves it (save_every = 0), exits 0; a resumed
    run continues at the next step. (Two ranks stopping together: the `moerun launch` test below.)"""
    out = tmp_path / "run"
    args = ["-m", "launch", "train", "--set", "train.steps=1000", "--set", "data.seq_len=32",
            "--set", "train.global_batch=4", "--set", f"train.out={out}"]
    proc = subprocess.Popen([sys.executable, *args], env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        pid = int(re.search(r" pid=(\d+)", first).group(1))
        _wait_for_steps(out / "metrics.jsonl", 2, proc)
        stdout, _ = _stop(proc, pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and n < 1000
    assert (out / "ckpt" / "latest").read_text().strip() == f"step-{n}"
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"moerun train: stopped \(SIGTERM\) after step {n} of 1000; checkpoint \S+step-{n} .*",
                        last), last
    args[args.index("train.steps=1000")] = f"train.steps={n + 2}"
    done = subprocess.run([sys.executable, *args], env=base_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {n}" in done.stdout
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n + 3))


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_sigterm_to_moerun_launch_stops_the_job_gracefully(tmp_path):
    """SIGTERM to `moerun launch -n 2 -- train` (what scancel or an operator's kill reaches): the launcher
    hands it to rank 0 alone (mpirun's own forwarding kills the ranks before a save), so the job stops at a
    step boundary on both ranks, saves that step and exits 0. Catches a launcher that signals the whole
    session: the ranks die mid-step, nothing is saved, the exit status is 143."""
    if mpirun_path() is None:
        pytest.skip("mpirun not found")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "launch", "-n", "2", "--", "train", "--set", "train.steps=1000",
           "--set", "data.seq_len=32", "--set", "train.global_batch=4", "--set", f"train.out={out}"]
    proc = subprocess.Popen(cmd, env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_steps(out / "metrics.jsonl", 2, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "asking rank 0" in stderr, stderr[-2000:]
    n = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert (out / "ckpt" / "latest").read_text().strip() == f"step-{n}"
    assert re.search(rf"moerun train: stopped \(SIGTERM\) after step {n} of 1000; checkpoint \S+step-{n} ",
                     stdout), stdout[-2000:]
