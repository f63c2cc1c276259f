"""One copy of the weights served and trained through ZeroMQ: train op == offline update, token versions,
pinning, no second copy. Single process, real sockets on loopback (port chosen by the OS)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from runtime.client import Client, ServerError

GEN = dict(max_tokens=10, ignore_eos=True)


def _stack(tmp_path, job_steps: int = 0, policy: str = "serve_first", pin: bool = False, reference: bool = False,
           record: bool = False, **train):
    from runtime.sched.scheduler import Scheduler, SchedulerConfig
    from runtime.sched.weights import WeightVersions
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.train.trainer import Trainer

    cfg = tiny_config(tmp_path, **{"lr": 3e-3, "warmup_steps": 0, **train})
    trainer = Trainer(cfg)
    engine = Engine(trainer.model, max_batch=8, max_model_len=128, max_prefill_tokens=32, page_size=8,
                    kv_cache_tokens=512)
    work = TrainWork(trainer, job_steps=job_steps, reference=reference, record=record)
    sched = Scheduler(engine, work, SchedulerConfig(policy, share=0.5, max_train_microsteps=4),
                      WeightVersions(engine, pin=pin))
    return cfg, trainer, engine, work, sched


def _server(sched):
    from runtime.serve.server import Server

    return Server(sched, bind="tcp://127.0.0.1:*").start()


def _rollout_op(vocab: int) -> dict:
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 9, 12, 7)]
    mask = [[0] * 4 + [1] * (len(r) - 4) for r in rows]
    old = [[float(-5.0 + 0.1 * j) for j in range(len(r))] for r in rows]
    return dict(input_ids=rows, loss_mask=mask, advantages=[1.0, -0.5, 0.25, -0.75], old_logprobs=old,
                loss="grpo")


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    from runtime.serve import Engine, SamplingParams

    eng = Engine(model, max_batch=2, max_model_len=128, max_prefill_tokens=32, page_size=8, kv_cache_tokens=256)
    eng.add_request("g", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    out: list[int] = []
    while eng.has_work():
        for o in eng.step():
            out += o.ids
    return out


@pytest.mark.timeout(120)
def test_train_op_then_greedy_equals_an_offline_copy_given_the_same_update(tmp_path):
    from runtime.sched.rl import RLBatch
    from runtime.sched.work import TrainWork
    from runtime.train.trainer import Trainer

    cfg, trainer, engine, work, sched = _stack(tmp_path / "a")
    srv = _server(sched)
    prompt = [3, 14, 15, 92, 65]
    op = _rollout_op(engine.vocab_size)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            before = c.generate(prompt_ids=prompt, **GEN)
            r1 = c.request("train", **op, optimizer_step=False)  # accumulate, no update yet
            r2 = c.request("train", input_ids=op["input_ids"][:2], loss="ce")  # then update
            after = c.generate(prompt_ids=prompt, **GEN)
            m = c.metrics()["metrics"]
    finally:
        srv.stop()
    assert before["weight_version"] == 0 and set(before["weight_versions"]) == {0}
    assert r1["op"] == "trained" and r1["weight_version"] == 0 and r1["step"] == 0
    assert r1["tokens"] == sum(len(r) - 4 for r in op["input_ids"])
    assert r2["weight_version"] == 1 and r2["step"] == 1 and r2["tokens"] == 12 + 9 - 2
    assert after["weight_version"] == 1 and set(after["weight_versions"]) == {1}
    assert m["weight_version"] == 1 and m["train_optimizer_steps"] == 1 and m["scheduler_optim_steps"] == 1

    # offline: a fresh copy, the same two ops applied directly (no server, no scheduler)
    ref = Trainer(cfg)
    ref_work = TrainWork(ref)
    got: list[dict] = []
    ref_work.submit(RLBatch.from_lists(op["input_ids"], op["loss_mask"], op["advantages"],
                                       op["old_logprobs"], "grpo"), False, got.append)
    ref_work.submit(RLBatch.from_lists(op["input_ids"][:2]), True, got.append)
    while ref_work.queue:
        item = ref_work.pop()
        (ref_work.run_micro if item.kind.name == "TRAIN_MICRO" else ref_work.run_optim)(item)
    assert abs(got[0]["loss"] - r1["loss"]) < 1e-6 and abs(got[1]["loss"] - r2["loss"]) < 1e-6
    for (n, p), (n2, q) in zip(trainer.model.named_parameters(), ref.model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    assert _greedy(ref.model, prompt, GEN["max_tokens"]) == after["ids"]
    changed = any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), Trainer(cfg).model.parameters()))
    assert changed


@pytest.mark.timeout(120)
def test_train_op_errors_follow_the_protocol(tmp_path):
    _, _, engine, _, sched = _stack(tmp_path)
    srv = _server(sched)
    ok = [[1, 2, 3]]
    bad = [
        (dict(input_ids=ok, loss="grpo"), "bad_request", "needs advantages"),
        (dict(input_ids=ok, advantages=[1.0]), "bad_request", "only to loss 'grpo'"),
        (dict(input_ids=[[1]]), "bad_request", "at least 2"),
        (dict(input_ids=[[1, 2, engine.vocab_size]]), "bad_request", "outside"),
        (dict(input_ids=ok, loss_mask=[[1, 0]]), "bad_request", "loss_mask[0] has 2 entries"),
        (dict(input_ids=ok, loss_mask=[[1, 0, 0]]), "bad_request", "no target token"),
        (dict(input_ids=ok, loss="grpo", advantages=[1.0], old_logprobs=[[0.0, float("nan"), 0.0]]),
         "bad_request", "finite"),
        (dict(input_ids=ok, loss="kl"), "bad_request", "'ce' or 'grpo'"),
        (dict(input_ids=ok, optimizer_step=1), "bad_request", "true or false"),
        (dict(input_ids=ok, lr=1.0), "bad_request", "unknown field"),
        (dict(input_ids=[[1] * 129]), "too_long", "max_model_len"),
    ]
    try:
        with Client(srv.endpoint, timeout=60) as c:
            for fields, code, text in bad:
                with pytest.raises(ServerError) as e:
                    c.request("train", **fields)
                assert e.value.code == code and text in str(e.value), (fields, e.value)
            assert c.request("train", input_ids=ok)["weight_version"] == 1  # still serving and training
            c.send({"op": "train", "input_ids": ok})  # no id: an error without an id
            reply = c.recv(None)
            assert reply["op"] == "error" and "needs an 'id'" in reply["message"]
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_server_without_training_rejects_train_ops(tmp_path):
    from runtime.model.loading import load_model
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    eng = Engine(load_model("builtin:tiny", mtp=False), max_batch=2, max_model_len=64, page_size=8,
                 kv_cache_tokens=128)
    srv = Server(Scheduler(eng), bind="tcp://127.0.0.1:*").start()
    try:
        with Client(srv.endpoint, timeout=60) as c:
            with pytest.raises(ServerError, match="--train"):
                c.request("train", input_ids=[[1, 2, 3]])
            assert c.generate(prompt_ids=[1, 2], max_tokens=3)["weight_version"] == 0
    finally:
        srv.stop()


def _versions_of_one_request(tmp_path, pin: bool) -> tuple[list[int], int]:
    _, trainer, _, work, sched = _stack(tmp_path, job_steps=10_000, policy="time_share", pin=pin)
    srv = _server(sched)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            done = c.generate(prompt_ids=[5, 6, 7, 8], max_tokens=24, ignore_eos=True)
            after = c.generate(prompt_ids=[5, 6], max_tokens=2, ignore_eos=True)
    finally:
        srv.stop()
    assert len(done["weight_versions"]) == 24 and done["weight_version"] == done["weight_versions"][-1]
    return done["weight_versions"], after["weight_versions"][0]


@pytest.mark.timeout(180)
def test_token_versions_never_decrease_and_pinning_keeps_one(tmp_path):
    v, _ = _versions_of_one_request(tmp_path / "free", pin=False)
    assert v == sorted(v) and v[-1] > v[0], v  # training progressed during the request, versions rose
    v, later = _versions_of_one_request(tmp_path / "pin", pin=True)
    assert len(set(v)) == 1, v  # pinned: the request saw one version
    assert later > v[0]  # and training went on after it


def test_no_second_copy_of_the_weights(tmp_path):
    from runtime.sched.weights import param_bytes, param_storages
    from runtime.train.trainer import Trainer

    cfg = tiny_config(tmp_path)
    alone = param_bytes(Trainer(cfg).model)
    _, trainer, engine, work, sched = _stack(tmp_path, lr=1e-3, warmup_steps=2)
    assert engine.model is trainer.model is work.model
    assert param_storages(engine.model) == param_storages(trainer.model)
    assert param_bytes(engine.model) == param_bytes(trainer.model) == alone
    reachable = {id(m) for m in (engine.model, work.model, sched.engine.model, trainer.model)}
    assert len(reachable) == 1


@pytest.mark.timeout(120)
def test_grpo_with_kl_to_the_frozen_reference_over_zmq(tmp_path):
    from runtime.sched.rl import RLBatch
    from runtime.sched.work import TrainWork
    from runtime.train.trainer import Trainer

    cfg, trainer, engine, work, sched = _stack(tmp_path / "a", reference=True)
    srv = _server(sched)
    op = _rollout_op(engine.vocab_size)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            r1 = c.request("train", **op, kl_coef=0.5)  # the policy still equals the reference: KL 0
            r2 = c.request("train", **op, kl_coef=0.5)  # now it moved away: KL > 0
    finally:
        srv.stop()
    assert r1["kl"] == pytest.approx(0.0, abs=1e-7) and r2["kl"] > 1e-6 and r2["weight_version"] == 2
    ref = Trainer(cfg)
    ref_work = TrainWork(ref, reference=True)
    for _ in range(2):
        ref_work.submit(RLBatch.from_lists(op["input_ids"], op["loss_mask"], op["advantages"],
                                           op["old_logprobs"], "grpo", kl_coef=0.5))
    while ref_work.queue:
        item = ref_work.pop()
        (ref_work.run_micro if item.kind.name == "TRAIN_MICRO" else ref_work.run_optim)(item)
    for p, q in zip(trainer.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    # the reference stayed frozen at version 0
    fresh = Trainer(cfg).model
    assert all(torch.equal(p, q) for p, q in zip(work.ref_model.parameters(), fresh.parameters()))


@pytest.mark.timeout(120)
def test_kl_without_a_reference_is_a_clear_error(tmp_path):
    _, _, engine, _, sched = _stack(tmp_path)
    srv = _server(sched)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            with pytest.raises(ServerError, match="kl_reference"):
                c.request("train", **_rollout_op(engine.vocab_size), kl_coef=0.1)
            with pytest.raises(ServerError, match="only to loss 'grpo'"):
                c.request("train", input_ids=[[1, 2, 3]], kl_coef=0.1)
            with pytest.raises(ServerError, match="kl_coef must be"):
                c.request("train", **_rollout_op(engine.vocab_size), kl_coef=-1)
    finally:
        srv.stop()


def test_metrics_file_and_checkpoints_like_moerun_train(tmp_path):
    import json
    import os

    from runtime.sched.rl import RLBatch
    from runtime.sched.scheduler import Kind
    from runtime.train.checkpoint import latest_checkpoint

    cfg, trainer, engine, work, sched = _stack(tmp_path, job_steps=2, record=True, save_every=2)
    while sched.step()[0] != Kind.IDLE:
        pass
    work.submit(RLBatch.from_lists([[1, 2, 3, 4]]))
    while sched.step()[0] != Kind.IDLE:
        pass
    with open(os.path.join(cfg["train"]["out"], "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [r["step"] for r in lines] == [1, 2, 3] and [r["source"] for r in lines] == ["job", "job", "train_op"]
    for r in lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "time_s"} <= set(r) and r["loss"] > 0
    assert lines[0]["weight_version"] == 1 and lines[2]["weight_version"] == 3
    assert latest_checkpoint(cfg["train"]["out"]).endswith("step-2")


@pytest.mark.timeout(120)
def test_a_failing_training_step_answers_internal_and_the_server_goes_on(tmp_path):
    _, trainer, engine, work, sched = _stack(tmp_path)
    real = work.run_micro

    def broken(item, backward=True):
        work.run_micro = real
        raise RuntimeError("injected")

    work.run_micro = broken
    srv = _server(sched)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            with pytest.raises(ServerError) as e:
                c.request("train", input_ids=[[1, 2, 3]])
            assert e.value.code == "internal" and "injected" in str(e.value)
            assert c.request("train", input_ids=[[1, 2, 3]])["weight_version"] == 1
            assert c.generate(prompt_ids=[1, 2], max_tokens=2)["weight_version"] == 1
    finally:
        srv.stop()
    assert not work.queue and trainer.step == 1


def test_serving_runs_between_forward_and_backward_of_a_micro_step(tmp_path):
    from runtime.sched.rl import RLBatch
    from runtime.sched.scheduler import Kind
    from runtime.sched.work import TrainWork
    from runtime.serve import SamplingParams
    from runtime.train.trainer import Trainer

    cfg, trainer, engine, work, sched = _stack(tmp_path)
    op = _rollout_op(engine.vocab_size)
    batch = lambda: RLBatch.from_lists(op["input_ids"], op["loss_mask"], op["advantages"],  # noqa: E731
                                       op["old_logprobs"], "grpo")
    work.submit(batch())
    kinds = [sched.step()[0]]  # the forward; then a request arrives
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    while (k := sched.step()[0]) != Kind.IDLE:
        kinds.append(k)
    assert kinds == [Kind.TRAIN_MICRO, Kind.SERVE, Kind.SERVE, Kind.TRAIN_BWD, Kind.OPTIM]
    ref = Trainer(cfg)
    ref_work = TrainWork(ref)
    ref_work.submit(batch())
    while ref_work.queue:
        item = ref_work.pop()
        (ref_work.run_micro if item.kind == Kind.TRAIN_MICRO else ref_work.run_optim)(item)
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), ref.model.parameters()))
