"""Client library for the moerun ZeroMQ server: blocking `Client` and `AsyncClient` (asyncio).

    with Client("tcp://127.0.0.1:5555") as c:
        done = c.generate(prompt_ids=[1, 2, 3], max_tokens=8)          # the `done` map
        for msg in c.stream(prompt="Hello", max_tokens=32):            # `token` maps, then the `done` map
            print(msg["ids"])

One DEALER socket per client; many requests may be in flight on it at once (replies are routed to the
right request by id). A stream left before its `done` (a `break` out of the loop) is aborted on the server
and its later replies are dropped, not kept. Errors come back as `ServerError(code, message)`. Beyond
loopback, a server with CurveZMQ needs `curve_server_key_file` (its NAME.key) and, to be admitted, this
client's `curve_secret_key_file` (NAME.key_secret, whose NAME.key the server lists). Replies are decoded as the
server decodes requests (msgpack only, string keys, bounded size): a reply that is not one msgpack map
raises `ReplyError`. A reply larger than `max_reply_bytes` makes ZeroMQ close the connection for good
(it does not reconnect after a protocol error): the wait for it, and later sends, end in `TimeoutError`;
a new client connects afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq
import zmq.asyncio

from runtime.serve.protocol import ProtocolError, decode_frame, encode

__all__ = ["Client", "AsyncClient", "ServerError", "ReplyError", "MAX_REPLY_BYTES"]

# A `done` with 20 top logprobs per token takes about 300 bytes a token: 64 MiB holds 200k tokens.
MAX_REPLY_BYTES = 64 << 20


class ServerError(RuntimeError):
    def __init__(self, code: str, message: str, reply: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.reply = code, message, reply or {}


class ReplyError(RuntimeError):
    """The server sent a frame that is not a reply this client can read (the message says why)."""


def _socket(ctx: zmq.Context, address: str, timeout: float | None, max_reply_bytes: int,
            curve_server_key_file: str | None = None, curve_secret_key_file: str | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes)  # larger replies: ZeroMQ drops the connection
    if timeout is not None:  # a send blocks only without a live connection (or at the high-water mark)
        sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    if curve_server_key_file:
        from runtime.serve.curve import secure_client

        try:
            secure_client(sock, curve_server_key_file, curve_secret_key_file)
        except Exception:
            sock.close(0)
            raise
    sock.connect(address)
    return sock


def _unpack(frame: bytes, max_bytes: int) -> dict:
    try:
        reply = decode_frame(frame, max_bytes, what="reply")
    except ProtocolError as e:
        raise ReplyError(f"unreadable reply from the server: {e.message}") from None
    request_id = reply.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ReplyError(f"reply id must be a string, got {type(request_id).__name__}")
    return reply


def _timeout_message(what: str, timeout: float | None, max_reply_bytes: int) -> str:
    return (f"{what} within {timeout} s (a reply over max_reply_bytes = {max_reply_bytes} closes the "
            "connection for good: use a new client)")


def _generate_msg(request_id: str, prompt: str | None, prompt_ids: list[int] | None, stream: bool,
                  **params: Any) -> dict:
    msg: dict[str, Any] = {"op": "generate", "id": request_id, "stream": stream, **params}
    if prompt is not None:
        msg["prompt"] = prompt
    if prompt_ids is not None:
        msg["prompt_ids"] = list(prompt_ids)
    return msg


def _raise_if_error(reply: dict) -> dict:
    if reply.get("op") == "error":
        raise ServerError(reply.get("code", "internal"), reply.get("message", ""), reply)
    return reply


class Client:
    """Blocking client. `timeout` (seconds, None = wait forever) bounds each wait for a reply;
    `max_reply_bytes` bounds one reply frame; `curve_*`: see the module docstring."""

    def __init__(self, address: str, timeout: float | None = 60.0, context: zmq.Context | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES, *, curve_server_key_file: str | None = None,
                 curve_secret_key_file: str | None = None) -> None:
        self.ctx = context or zmq.Context.instance()
        self.sock = _socket(self.ctx, address, timeout, max_reply_bytes, curve_server_key_file,
                            curve_secret_key_file)
        self.timeout, self.max_reply_bytes = timeout, max_reply_bytes
        self._ids = itertools.count()
        self._prefix = f"c{os.getpid()}-{id(self):x}-"
        self._inbox: dict[str, deque] = defaultdict(deque)
        self._abandoned: set[str] = set()  # streams left early: their replies are dropped until the last

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(0)

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def send(self, msg: dict) -> None:
        try:
            self.sock.send(encode(msg))
        except zmq.Again:
            raise TimeoutError(_timeout_message("could not send", self.timeout, self.max_reply_bytes)) from None

    def recv(self, request_id: str | None) -> dict:
        """Next reply for `request_id` (replies for other ids are kept for their own callers). A frame that is
        not a readable reply raises `ReplyError` here, whichever request it was for."""
        box = self._inbox.get(request_id)
        if box:
            return box.popleft()
        while True:
            if self.timeout is not None and not self.sock.poll(int(self.timeout * 1000)):
                raise TimeoutError(_timeout_message(f"no reply for request {request_id!r}", self.timeout,
                                                    self.max_reply_bytes))
            reply = _unpack(self.sock.recv(), self.max_reply_bytes)
            got = reply.get("id")
            if got == request_id:
                return reply
            if got in self._abandoned:
                if reply.get("op") in ("done", "error"):
                    self._abandoned.discard(got)
                continue
            self._inbox[got].append(reply)

    def request(self, op: str, **fields: Any) -> dict:
        request_id = fields.pop("id", None) or self.new_id()
        self.send({"op": op, "id": request_id, **fields})
        return _raise_if_error(self.recv(request_id))

    def health(self) -> dict:
        return self.request("health")

    def info(self) -> dict:
        return self.request("info")

    def metrics(self) -> dict:
        return self.request("metrics")

    def save(self) -> dict:
        """A `moerun serve --train` server checkpoints now: `{"op": "saved", "path", "step", "weight_version"}`."""
        return self.request("save")

    def submit(self, prompt: str | None = None, prompt_ids: list[int] | None = None, *, stream: bool = False,
               request_id: str | None = None, **params: Any) -> str:
        """Send a generate request without waiting; returns its id (read replies with `recv(id)`)."""
        request_id = request_id or self.new_id()
        self.send(_generate_msg(request_id, prompt, prompt_ids, stream, **params))
        return request_id

    def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None, **params: Any) -> dict:
        """Generate and return the `done` map (ids, finish_reason, usage, logprobs if asked)."""
        request_id = self.submit(prompt, prompt_ids, stream=False, **params)
        return _raise_if_error(self.recv(request_id))

    def stream(self, prompt: str | None = None, prompt_ids: list[int] | None = None, *,
               request_id: str | None = None, **params: Any) -> Iterator[dict]:
        """Yield `token` maps as they arrive, then the `done` map. Leaving early aborts the request."""
        request_id = self.submit(prompt, prompt_ids, stream=True, request_id=request_id, **params)
        ended = False
        try:
            while True:
                reply = self.recv(request_id)
                ended = reply.get("op") in ("done", "error")
                yield _raise_if_error(reply)
                if ended:
                    return
        finally:
            if not ended:
                self._abandon(request_id)

    def _abandon(self, request_id: str) -> None:
        """Stop reading `request_id`: abort it, drop what was kept for it and what still comes."""
        self._inbox.pop(request_id, None)
        self._abandoned.add(request_id)
        try:
            self.abort(request_id)
        except (TimeoutError, zmq.ZMQError):
            pass  # no server to tell: its replies, if any, are dropped all the same

    def abort(self, request_id: str, abort_key: str | None = None) -> None:
        """Ask the server to end request `request_id` (of this connection, or of another one when
        `abort_key` is the key its generate gave); its `done` (finish_reason "abort") goes to its reader."""
        msg = {"op": "abort", "id": request_id}
        if abort_key is not None:
            msg["abort_key"] = abort_key
        self.send(msg)


class AsyncClient:
    """asyncio client: one reader task routes replies to per-request queues. `timeout` and
    `max_reply_bytes` as for `Client`; a frame that is not a readable reply fails every waiting request
    with `ReplyError` (whose it was cannot be told) and the reader goes on."""

    def __init__(self, address: str, context: zmq.asyncio.Context | None = None, *, timeout: float | None = 60.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES, curve_server_key_file: str | None = None,
                 curve_secret_key_file: str | None = None) -> None:
        self.ctx = context or zmq.asyncio.Context.instance()
        self.sock = _socket(self.ctx, address, timeout, max_reply_bytes, curve_server_key_file,
                            curve_secret_key_file)
        self.timeout, self.max_reply_bytes = timeout, max_reply_bytes
        self._ids = itertools.count()
        self._prefix = f"a{os.getpid()}-{id(self):x}-"
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)

    def _queue(self, request_id: str) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return self._queues.setdefault(request_id, asyncio.Queue())

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                reply = _unpack(frame, self.max_reply_bytes)
            except ReplyError as e:
                for q in self._queues.values():
                    q.put_nowait(ReplyError(str(e)))
                continue
            q = self._queues.get(reply.get("id"))
            if q is not None:
                q.put_nowait(reply)

    async def _next(self, request_id: str, q: asyncio.Queue) -> dict:
        try:
            item = await asyncio.wait_for(q.get(), self.timeout)
        except TimeoutError:
            raise TimeoutError(_timeout_message(f"no reply for request {request_id!r}", self.timeout,
                                                self.max_reply_bytes)) from None
        if isinstance(item, ReplyError):
            raise item
        return _raise_if_error(item)

    async def _send(self, msg: dict) -> None:
        try:
            await self.sock.send(encode(msg))
        except zmq.Again:
            raise TimeoutError(_timeout_message("could not send", self.timeout, self.max_reply_bytes)) from None

    async def _call(self, msg: dict) -> dict:
        q = self._queue(msg["id"])
        try:
            await self._send(msg)
            return await self._next(msg["id"], q)
        finally:
            self._queues.pop(msg["id"], None)

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def request(self, op: str, **fields: Any) -> dict:
        request_id = fields.pop("id", None) or self.new_id()
        return await self._call({"op": op, "id": request_id, **fields})

    async def health(self) -> dict:
        return await self.request("health")

    async def info(self) -> dict:
        return await self.request("info")

    async def metrics(self) -> dict:
        return await self.request("metrics")

    async def save(self) -> dict:
        return await self.request("save")

    async def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None, **params: Any
                       ) -> dict:
        return await self._call(_generate_msg(self.new_id(), prompt, prompt_ids, False, **params))

    async def stream(self, prompt: str | None = None, prompt_ids: list[int] | None = None, *,
                     request_id: str | None = None, **params: Any) -> AsyncIterator[dict]:
        request_id = request_id or self.new_id()
        q = self._queue(request_id)
        ended = False
        try:
            await self._send(_generate_msg(request_id, prompt, prompt_ids, True, **params))
            while True:
                try:
                    reply = await self._next(request_id, q)
                except ServerError:
                    ended = True
                    raise
                ended = reply.get("op") == "done"
                yield reply
                if ended:
                    return
        finally:
            self._queues.pop(request_id, None)  # later replies for it are dropped by the reader
            if not ended:
                try:
                    await self.abort(request_id)
                except (TimeoutError, zmq.ZMQError):
                    pass

    async def abort(self, request_id: str, abort_key: str | None = None) -> None:
        msg = {"op": "abort", "id": request_id}
        if abort_key is not None:
            msg["abort_key"] = abort_key
        await self._send(msg)
