"""Hostile and careless clients against one server (builtin:tiny, real sockets on loopback): a request whose
sampling cannot be computed, a connection aborting another's request, one connection flooding the queue at
top priority, a client that goes away mid-stream, a health check that cannot finish, a client that abandons
its streams. Each ends that client's requests only; everyone else is served."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from runtime.client import Client

LONG = dict(max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    from runtime.model.loading import load_model

    return load_model("builtin:tiny", mtp=False)


def _server(model, engine_kw: dict | None = None, **kw):
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    opts = dict(max_batch=8, max_model_len=256, max_prefill_tokens=64, page_size=8, kv_cache_tokens=4096)
    opts.update(engine_kw or {})
    return Server(Scheduler(Engine(model, **opts)), bind="tcp://127.0.0.1:*", **kw).start()


def _dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _wait_for(pred, what: str, timeout_s: float = 60.0):
    """Poll `pred()` until it returns something truthy (bounded wait for an effect on the server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# --- finding 1: sampling that cannot be computed -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sampling_parameters_that_underflow_fail_nobody(model):
    """temperature in (0, 1e-38) and top_p below float32's smallest number used to make sampling NaN and fail
    the step, ending every client's requests: now they are served (temperature below 1e-5 is greedy; the most
    likely token always stays in the nucleus) and the other client never notices."""
    srv = _server(model)
    try:
        with Client(srv.endpoint, timeout=60) as victim, Client(srv.endpoint, timeout=60) as hostile:
            rid = victim.submit(prompt_ids=[5, 6, 7], max_tokens=12, ignore_eos=True)
            greedy = hostile.generate(prompt_ids=[1, 2, 3], max_tokens=6, ignore_eos=True)["ids"]
            tiny_t = hostile.generate(prompt_ids=[1, 2, 3], max_tokens=6, ignore_eos=True, temperature=1e-39)
            tiny_p = hostile.generate(prompt_ids=[1, 2, 3], max_tokens=6, ignore_eos=True, temperature=1.0,
                                      top_p=1e-46, seed=3)
            done = victim.recv(rid)
        assert tiny_t["ids"] == greedy  # made safe: greedy
        assert tiny_p["ids"] == greedy  # the nucleus keeps the most likely token
        assert done["op"] == "done" and done["finish_reason"] == "length" and len(done["ids"]) == 12
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_a_sampling_failure_ends_that_request_only(model, monkeypatch):
    """Whatever goes wrong while sampling one request's token ends that request with `internal`; the other
    requests of the same step go on."""
    import runtime.serve.sampling as sampling_mod

    real_rows, real = sampling_mod.sample_rows, sampling_mod.sample

    def sample_rows(logits, params, generators):  # the step's batched sampling: that row fails it all
        if any(p.seed == 666 for p in params):
            raise RuntimeError("probability tensor contains nan")
        return real_rows(logits, params, generators)

    def sample(logits, params, generator):  # then row by row: only that request's fails
        if params.seed == 666:
            raise RuntimeError("probability tensor contains nan")
        return real(logits, params, generator)

    monkeypatch.setattr(sampling_mod, "sample_rows", sample_rows)
    monkeypatch.setattr(sampling_mod, "sample", sample)
    srv = _server(model)
    try:
        with Client(srv.endpoint, timeout=60) as a, Client(srv.endpoint, timeout=60) as b:
            ra = a.submit(prompt_ids=[5, 6, 7], max_tokens=10, ignore_eos=True)
            rb = b.submit(prompt_ids=[5, 6, 7], max_tokens=10, ignore_eos=True, temperature=1.0, seed=666)
            bad = b.recv(rb)
            good = a.recv(ra)
        assert bad["op"] == "error" and bad["code"] == "internal" and "sampling" in bad["message"]
        assert "nan" in bad["message"]
        assert good["op"] == "done" and len(good["ids"]) == 10
        m = Client(srv.endpoint).metrics()["metrics"]
        assert m["kv_pages_used"] == 0 and m["requests_running"] == 0
    finally:
        srv.stop()


# --- finding 3: abort ownership -------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_connection_cannot_abort_another_connections_request(model):
    srv = _server(model)
    try:
        with Client(srv.endpoint, timeout=60) as owner, Client(srv.endpoint, timeout=60) as other:
            owner.submit(prompt_ids=[1, 2, 3], request_id="r1", max_tokens=40, ignore_eos=True)
            owner.submit(prompt_ids=[1, 2, 3], request_id="r2", max_tokens=240, ignore_eos=True,
                         abort_key="s3cret-r2")  # still running when r1 (40 tokens) is done
            other.send({"op": "abort", "id": "r1"})
            refused = other.recv("r1")
            other.send({"op": "abort", "id": "r2", "abort_key": "wrong"})
            refused_key = other.recv("r2")
            # the answer is the one an unknown id gets: it does not confirm that "r1" exists elsewhere
            other.send({"op": "abort", "id": "nobody-has-this"})
            unknown = other.recv("nobody-has-this")
            assert refused["code"] == refused_key["code"] == unknown["code"] == "bad_request"
            assert refused["message"] == unknown["message"].replace("nobody-has-this", "r1")
            assert owner.recv("r1")["finish_reason"] == "length"
            # with the secret the owner chose, another connection may abort (moerun client abort)
            other.send({"op": "abort", "id": "r2", "abort_key": "s3cret-r2"})
            assert other.recv("r2") == {"op": "aborted", "id": "r2"}
            assert owner.recv("r2")["finish_reason"] == "abort"
    finally:
        srv.stop()


# --- finding 4: per-connection limits -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_one_connection_cannot_take_the_queue_or_every_running_slot(model):
    srv = _server(model, engine_kw=dict(max_batch=2), max_queue=16, max_queue_per_client=6)
    flood = _dealer(srv.endpoint)
    try:
        flood.send(msgpack.packb({"op": "generate", "id": "top", "prompt_ids": [1], "priority": 2**31 - 1}))
        top = msgpack.unpackb(flood.recv())
        assert top["code"] == "bad_request" and "priority" in top["message"] and "serve.max_priority" in top["message"]
        for i in range(20):  # at the highest priority a client may use
            flood.send(msgpack.packb({"op": "generate", "id": f"f{i}", "prompt_ids": [1, 2], "priority": 1000,
                                      **LONG}))
        with Client(srv.endpoint, timeout=120) as polite:
            done = polite.generate(prompt_ids=[3, 4], max_tokens=4, ignore_eos=True)
            assert done["op"] == "done" and len(done["ids"]) == 4
            # the flood's requests beyond its share were refused, naming the limit
            got = []
            while flood.poll(0):
                got.append(msgpack.unpackb(flood.recv()))
            refused = [m for m in got if m["op"] == "error"]
            assert len(refused) == 14 and all(m["code"] == "queue_full" for m in refused)
            assert "serve.max_queue_per_client" in refused[0]["message"]
            # ... and the polite request ran on a fair share of the running slots: it finished while the
            # flood's first two (each 200 tokens long) were still generating
            assert not [m for m in got if m["op"] == "done"]
    finally:
        flood.close(0)
        srv.stop()


# --- finding 5: clients that go away ---------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_departed_clients_requests_end_and_free_their_pages(model):
    srv = _server(model, engine_kw=dict(max_model_len=1024))
    try:
        with Client(srv.endpoint, timeout=60) as watcher:
            gone = _dealer(srv.endpoint)
            for i in range(6):
                gone.send(msgpack.packb({"op": "generate", "id": f"g{i}", "prompt_ids": [1, 2, 3], "stream": True,
                                         "max_tokens": 1000, "ignore_eos": True}))
            assert msgpack.unpackb(gone.recv())["op"] == "token"  # they are generating
            gone.close(0)
            m = _wait_for(lambda: (lambda m: m if m["requests_aborted_total"] == 6 else None)(
                watcher.metrics()["metrics"]), "the departed client's 6 requests to be aborted")
            assert m["requests_running"] == 0 and m["kv_pages_used"] == 0
            assert m["generation_tokens_total"] < 6 * 1000
    finally:
        srv.stop()


# --- finding 10: health checks time out, abandoned streams are not kept --------------------------------------
@pytest.mark.timeout(120)
def test_a_health_check_that_cannot_finish_times_out(model):
    srv = _server(model, health_timeout_s=0.5)
    srv.engine.step = lambda: []  # a stuck engine: it never produces a token
    try:
        with Client(srv.endpoint, timeout=60) as c:
            h = c.health()
        assert h["op"] == "health" and h["ok"] is False and h["status"] == "timeout"
        assert not srv.engine.requests  # the stuck health request was taken back
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_the_sync_client_drops_the_replies_of_abandoned_streams(model):
    srv = _server(model)
    try:
        with Client(srv.endpoint, timeout=60) as c:
            for _ in range(20):
                for msg in c.stream(prompt_ids=[1, 2, 3], max_tokens=150, ignore_eos=True):
                    assert msg["op"] == "token"
                    break  # abandon the stream after its first token
            assert c.generate(prompt_ids=[4, 5], max_tokens=3)["op"] == "done"
            _wait_for(lambda: c.metrics()["metrics"]["requests_running"] == 0, "the abandoned streams to end")
            assert sum(len(q) for q in c._inbox.values()) == 0
    finally:
        srv.stop()

