"""A failed step, in the engine or in the scheduler around it: every request in flight and every waiting
health check gets an `internal` error naming the failure, and a one-rank server goes on serving."""

from __future__ import annotations

import pytest

from runtime.client import Client


def _server(kind: str):
    from runtime.model.loading import load_model
    from runtime.sched.scheduler import Kind, Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    eng = Engine(load_model("builtin:tiny", mtp=False), max_batch=4, max_model_len=64, page_size=8,
                 kv_cache_tokens=256)
    sched = Scheduler(eng)
    srv = Server(sched, bind="tcp://127.0.0.1:*")
    # `owner.step` fails once; `idle` is what a step that did nothing returns
    owner, idle = (eng, []) if kind == "engine" else (sched, (Kind.SERVE, []))
    real = owner.step

    def failing_step():
        # Hold off until both generates and the health check are in the engine, then fail once.
        if len(eng.requests) < 3:
            return idle
        owner.step = real
        raise RuntimeError("boom")

    owner.step = failing_step
    return srv.start(), eng


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["engine", "scheduler"])
def test_failed_step_fails_everything_in_flight_then_serves(kind):
    srv, eng = _server(kind)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            rids = [c.submit(prompt_ids=[1, 2, 3], max_tokens=8) for _ in range(2)]
            hid = c.new_id()
            c.send({"op": "health", "id": hid})
            replies = [c.recv(r) for r in [*rids, hid]]
            for rid, reply in zip([*rids, hid], replies):
                assert reply == {"op": "error", "id": rid, "code": "internal",
                                 "message": "step failed: RuntimeError: boom"}
            assert not eng.requests and not srv.active and not srv.health.waiters
            done = c.generate(prompt_ids=[1, 2, 3], max_tokens=4)
            assert done["op"] == "done" and len(done["ids"]) == 4
            assert c.health()["ok"] is True
    finally:
        srv.stop()
