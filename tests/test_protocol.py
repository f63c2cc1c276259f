"""Request validation: every field's type, range and length, and the error codes."""

from __future__ import annotations

import msgpack
import pytest

from runtime.serve.protocol import AbortRequest, ProtocolError, decode_frame, error_reply, validate_request

V, L = 100, 64


def check(msg: dict):
    return validate_request(msg, vocab_size=V, max_model_len=L)


def code_of(msg: dict) -> str:
    with pytest.raises(ProtocolError) as e:
        check(msg)
    assert e.value.message
    return e.value.code


def gen(**kw) -> dict:
    return {"op": "generate", "id": "r1", "prompt_ids": [1, 2], **kw}


def test_valid_generate_defaults():
    op, req = check(gen())
    assert op == "generate" and req.id == "r1" and req.prompt_ids == [1, 2]
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (16, 0.0, 1.0, 0, None)
    assert (req.stop_ids, req.stream, req.logprobs, req.priority) == ((), False, 0, 0)
    op, req = check({"op": "generate", "id": "x", "prompt": "hi", "temperature": 1, "seed": 7, "stream": True})
    assert req.prompt == "hi" and req.temperature == 1.0 and req.seed == 7 and req.stream


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens="5"), dict(max_tokens=True), dict(max_tokens=1.5),
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="hot"),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-1), dict(seed=2**64), dict(seed="s"),
    dict(stop_ids=[V]), dict(stop_ids=list(range(65))), dict(stop_ids="1"), dict(stream="yes"),
    dict(logprobs=21), dict(logprobs=-1), dict(priority=2**40), dict(prompt_ids=[]), dict(prompt_ids=[-1]),
    dict(prompt_ids=[V]), dict(prompt_ids=[1.0]), dict(prompt_ids=[True]), dict(prompt_ids="12"),
    dict(prompt="x"), dict(unexpected=1), dict(id=""), dict(id=5), dict(id="x" * 300),
])
def test_bad_generate_fields(bad):
    assert code_of(gen(**bad)) == "bad_request"


def test_lengths_and_ops():
    assert code_of(gen(prompt_ids=[1] * 60, max_tokens=5)) == "too_long"
    assert code_of(gen(prompt_ids=[1] * 65)) == "too_long"
    assert code_of(gen(max_tokens=L + 1)) == "too_long"
    assert code_of({"op": "generate", "id": "a", "prompt": "x" * (32 * L + 1)}) == "too_long"
    assert code_of({"op": "fly", "id": "a"}) == "unknown_op"
    assert code_of({"id": "a"}) == "bad_request"
    assert code_of({"op": 3}) == "bad_request"
    assert code_of({"op": "abort"}) == "bad_request"
    assert check({"op": "abort", "id": "a"}) == ("abort", AbortRequest("a"))
    assert check({"op": "abort", "id": "a", "abort_key": "k"}) == ("abort", AbortRequest("a", "k"))
    assert code_of({"op": "abort", "id": "a", "abort_key": ""}) == "bad_request"
    assert code_of({"op": "abort", "id": "a", "bogus": 1}) == "bad_request"
    assert check({"op": "health"}) == ("health", None)
    assert check({"op": "metrics", "id": "m"}) == ("metrics", "m")
    assert code_of({"op": "generate", "id": "a"}) == "bad_request"  # no prompt
    assert code_of({"op": "generate", "id": "a", "prompt": "x", "prompt_ids": [1]}) == "bad_request"


def test_decode_frame():
    assert decode_frame(msgpack.packb({"op": "health"})) == {"op": "health"}
    for frame in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({1: 2}), msgpack.packb(1) + b"x",
                  b"\xdb\x7f\xff\xff\xff"):
        with pytest.raises(ProtocolError) as e:
            decode_frame(frame)
        assert e.value.code == "bad_request"
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_frame(bytes(2000), max_bytes=1000)


def test_error_reply_shape():
    r = error_reply("queue_full", "m" * 5000, "id1")
    assert r["op"] == "error" and r["code"] == "queue_full" and r["id"] == "id1" and len(r["message"]) == 1000
    assert "id" not in error_reply("internal", "x")
