"""`train` ops and checkpoints under hostile input and failing disks (builtin:tiny, one process, real sockets).

A small frame cannot become a huge padded batch; the train queue is bounded in bytes; a checkpoint that
cannot be written (the file-size limit of the process stands in for a full disk: the kernel fails the
writes with EFBIG) leaves the applied update applied, says so truthfully, and a retry of the same op
applies nothing; the job's data cursor stays exact (re-saving a step: tests/test_ckpt.py).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal

import pytest
import torch
from train_helpers import tiny_config

from runtime.client import Client


def _stack(tmp_path, job_steps: int = 0, record: bool = False, max_model_len: int = 128, **train):
    from runtime.sched.scheduler import Scheduler
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.train.trainer import Trainer

    cfg = tiny_config(tmp_path, **{"lr": 3e-3, "warmup_steps": 0, **train})
    trainer = Trainer(cfg)
    engine = Engine(trainer.model, max_batch=8, max_model_len=max_model_len, max_prefill_tokens=32, page_size=8,
                    kv_cache_tokens=512)
    work = TrainWork(trainer, job_steps=job_steps, record=record)
    return cfg, trainer, engine, work, Scheduler(engine, work)


def _server(sched, **kw):
    from runtime.serve.server import Server

    return Server(sched, bind="tcp://127.0.0.1:*", **kw).start()


@contextlib.contextmanager
def disk_full(limit: int = 64 << 10):
    """Files of this process cannot grow past `limit` bytes while inside (writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- finding 6: amplification ------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_small_train_frame_cannot_become_a_huge_padded_batch(tmp_path):
    _, trainer, engine, work, sched = _stack(tmp_path, max_model_len=4096)
    submitted = []
    work.submit = lambda batch, step, done: (submitted.append(batch), done({"step": 0}))  # record, never run
    srv = _server(sched)
    vocab = engine.vocab_size
    try:
        with Client(srv.endpoint, timeout=60) as c:
            # 16 KB on the wire: one 4096-token row and 4095 rows of 2 tokens -> 4096 x 4096 once padded
            rows = [[i % vocab for i in range(4096)]] + [[1, 2]] * 4095
            c.send({"op": "train", "id": "amp", "input_ids": rows})
            amp = c.recv("amp")
            c.send({"op": "train", "id": "pad", "input_ids": rows[:1000]})  # within the row and token bounds
            pad = c.recv("pad")
            c.send({"op": "train", "id": "wide", "input_ids": [[1, 2]] * 2000})
            wide = c.recv("wide")
            assert c.request("train", id="fine", input_ids=[[1, 2, 3, 4]] * 8)["op"] == "trained"
        assert amp["op"] == "error" and amp["code"] == "too_long", amp
        assert pad["op"] == "error" and pad["code"] == "too_long", pad
        assert "serve.max_train_batch_bytes" in pad["message"] and "1000 rows padded" in pad["message"]
        assert wide["code"] == "too_long" and "serve.max_train_rows" in wide["message"]
        assert [tuple(b.input_ids.shape) for b in submitted] == [(8, 4)]
    finally:
        srv.stop()


@pytest.mark.timeout(180)
def test_the_train_queue_is_bounded_in_bytes(tmp_path):
    from runtime.serve.protocol import TrainLimits

    _, trainer, engine, work, sched = _stack(tmp_path)
    op = dict(input_ids=[[1, 2, 3, 4, 5, 6, 7, 8]] * 16)
    one = TrainLimits.batch_bytes(16, 8, False)
    srv = _server(sched, max_train_queue_bytes=one + one // 2)  # room for one queued op, not two
    try:
        with Client(srv.endpoint, timeout=120) as c:
            # serve_first: training waits while a request is generating, so the ops stay queued
            rid = c.submit(prompt_ids=[1, 2, 3], max_tokens=100, ignore_eos=True)
            c.send({"op": "train", "id": "q1", **op})
            c.send({"op": "train", "id": "q2", **op})
            second = c.recv("q2")
            assert second["op"] == "error" and second["code"] == "queue_full", second
            assert "serve.max_train_queue_bytes" in second["message"]
            assert c.recv("q1")["op"] == "trained"
            assert c.recv(rid)["finish_reason"] == "length"
    finally:
        srv.stop()


# --- finding 7: a failed save after an applied update -------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_failed_save_reports_the_applied_update_and_a_retry_applies_nothing(tmp_path):
    from runtime.train.checkpoint import latest_checkpoint

    cfg, trainer, engine, work, sched = _stack(tmp_path, record=True, save_every=1)
    srv = _server(sched)
    op = dict(input_ids=[[1, 2, 3, 4, 5, 6]] * 4)
    try:
        with Client(srv.endpoint, timeout=120) as c, Client(srv.endpoint, timeout=120) as retry:
            with disk_full():
                first = c.request("train", id="t1", **op)
                c.send({"op": "save", "id": "s1"})  # a save op on the full disk: its error, the server goes on
                save = c.recv("s1")
            after = _params(trainer.model)
            again = retry.request("train", id="t1", **op)  # e.g. a client that lost the first reply
            c.send({"op": "train", "id": "t1", "input_ids": [[3, 2, 1]]})  # the same id, another op
            clash = c.recv("t1")
            version = c.metrics()["metrics"]["weight_version"]
            ckpt = os.path.join(cfg["train"]["out"], "ckpt")
            kept = [d for d in os.listdir(ckpt) if d.startswith((".tmp-", "step-"))]
    finally:
        srv.stop()  # a graceful stop: it saves the update that no checkpoint holds yet
    assert first["op"] == "trained" and first["weight_version"] == 1 and first["step"] == 1
    assert "not saved" in first["save_error"] and "File too large" in first["save_error"]
    assert save["op"] == "error" and save["code"] == "internal" and "not saved" in save["message"], save
    assert again == {**first, "duplicate": True}
    assert clash["code"] == "bad_request" and "already used" in clash["message"]
    assert version == 1 and trainer.step == 1
    assert all(torch.equal(a, b) for a, b in zip(after, _params(trainer.model)))
    assert kept == []  # nothing half-written kept
    assert latest_checkpoint(cfg["train"]["out"]).endswith("step-1")  # written by the stop, disk space back


@pytest.mark.timeout(240)
def test_a_failed_save_in_the_job_keeps_the_data_cursor_and_resumes_exactly(tmp_path):
    from runtime.sched.scheduler import Kind
    from runtime.train.checkpoint import latest_checkpoint
    from runtime.train.trainer import Trainer

    cfg, trainer, engine, work, sched = _stack(tmp_path / "run", job_steps=3, record=True, save_every=1)
    with disk_full():
        while trainer.step < 1:
            sched.step()
    while sched.step()[0] != Kind.IDLE:
        pass
    assert trainer.step == 3 and work.job_cursor == 3 and work.job_steps_done == 3 and work.save_failures == 1
    assert latest_checkpoint(cfg["train"]["out"]).endswith("step-3")
    assert not os.path.exists(os.path.join(cfg["train"]["out"], "ckpt", "step-1"))

    ref_cfg, ref, _, ref_work, ref_sched = _stack(tmp_path / "ref", job_steps=3)  # the same job, no failure
    while ref_sched.step()[0] != Kind.IDLE:
        pass
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer.model), _params(ref.model)))
    resumed = Trainer(cfg, resume_from=latest_checkpoint(cfg["train"]["out"]))
    assert resumed.step == 3
    assert all(torch.equal(a, b) for a, b in zip(_params(resumed.model), _params(ref.model)))
