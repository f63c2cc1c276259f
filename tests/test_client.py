"""The client against a misbehaving server: a real ZeroMQ ROUTER socket answers with bad frames.

Every bad reply ends the wait with a clear `ReplyError` and the client goes on working. A reply over the
size bound makes ZeroMQ close the connection for good: the wait, and later sends, end in a `TimeoutError`
naming the bound (never a hang), and a new client works.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq

from runtime.client import AsyncClient, Client, ReplyError

BAD_REPLIES = [
    (b"\xc1", "not one valid msgpack object"),  # 0xc1 is never used by msgpack
    (msgpack.packb({"op": "done"}) + b"\x01", "not one valid msgpack object"),  # trailing bytes
    (msgpack.packb([1, 2]), "a reply must be a msgpack map, got list"),
    (msgpack.packb({1: "x"}), "not one valid msgpack object"),  # non-string key (strict_map_key)
    (msgpack.packb({"op": "done", "id": [1]}), "reply id must be a string, got list"),
]


@pytest.fixture
def router():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)
    ctx.term()


def answer(sock, frame_of) -> None:
    """Take one request and send back `frame_of(request)` on its connection."""
    peer, frame = sock.recv_multipart()
    sock.send_multipart([peer, frame_of(msgpack.unpackb(frame))])


def done_frame(req: dict, pad: int = 0) -> bytes:
    return msgpack.packb({"op": "done", "id": req["id"], "ids": [1], "pad": "x" * pad})


@pytest.mark.timeout(60)
def test_client_raises_reply_error_on_bad_replies_and_goes_on(router):
    sock, addr = router
    with Client(addr, timeout=10) as c:
        for bad, why in BAD_REPLIES:
            rid = c.submit(prompt_ids=[1], max_tokens=1)
            answer(sock, lambda req, bad=bad: bad)
            with pytest.raises(ReplyError, match=why):
                c.recv(rid)
        rid = c.submit(prompt_ids=[1], max_tokens=1)
        answer(sock, done_frame)
        assert c.recv(rid)["ids"] == [1]


@pytest.mark.timeout(60)
def test_client_oversize_reply_times_out_and_later_sends_too(router):
    sock, addr = router
    with Client(addr, timeout=1.0, max_reply_bytes=1024) as c:
        assert c.sock.getsockopt(zmq.MAXMSGSIZE) == 1024
        rid = c.submit(prompt_ids=[1], max_tokens=1)
        answer(sock, lambda req: done_frame(req, pad=4096))
        with pytest.raises(TimeoutError, match=r"no reply for request .* max_reply_bytes = 1024"):
            c.recv(rid)
        with pytest.raises(TimeoutError, match="could not send"):
            c.submit(prompt_ids=[1], max_tokens=1)
    with Client(addr, timeout=10, max_reply_bytes=1024) as c:  # a reply within the bound gets through
        rid = c.submit(prompt_ids=[1], max_tokens=1)
        answer(sock, lambda req: done_frame(req, pad=900))
        assert c.recv(rid)["id"] == rid


@pytest.mark.timeout(60)
def test_async_client_bad_reply_and_oversize_reply(router):
    sock, addr = router

    async def call(c, *answers):
        task = asyncio.ensure_future(c.generate(prompt_ids=[1], max_tokens=1))
        for frame_of in answers:
            await asyncio.to_thread(answer, sock, frame_of)
        return await task

    async def main():
        async with AsyncClient(addr, timeout=1.0, max_reply_bytes=1024) as c:
            for bad, why in BAD_REPLIES:
                with pytest.raises(ReplyError, match=why):
                    await call(c, lambda req, bad=bad: bad)
            ok = await call(c, done_frame)
            with pytest.raises(TimeoutError, match=r"no reply for request .* max_reply_bytes = 1024"):
                await call(c, lambda req: done_frame(req, pad=4096))
            with pytest.raises(TimeoutError, match="could not send"):
                await c.health()
            return ok

    assert asyncio.run(main())["ids"] == [1]
