"""The ZeroMQ ROUTER server: one thread receives, validates, asks the shared scheduler for a step, replies.

There is one serving loop for every way of serving: the server always drives a `runtime.sched.Scheduler`,
whose training side is empty unless the job trains (`moerun serve --train`), on one rank or on the driver
rank of many. Loopback by default; CurveZMQ (runtime.serve.curve) authenticates and encrypts beyond it.
Frames are msgpack maps (never pickle), validated by `runtime.serve.protocol` before they reach the engine;
every problem gets an `error` reply and the loop goes on. Memory stays bounded: frames above the soft bound
get `bad_request` (above a hard bound ZeroMQ drops the sender), at most `serve.max_queue` requests wait and
one connection holds at most `serve.max_queue_per_client`, a request's outputs are bounded by its
max_tokens, `train` ops by `serve.max_train_*`, and socket queues have high-water marks.

No client can hurt another's requests: priorities are capped below the health check's, each connection
gets a fair share of the running slots (the engine's `owner`), only the connection that sent a request
(or one holding the `abort_key` it chose) can abort it, a request whose sampling fails ends alone, and a
client that goes away has its requests ended and its pages freed (runtime.serve.peers).

Request ids are per connection: the wire `id` is the client's `request_id`; the engine is keyed by
`key` = connection identity + ":" + request_id. Every token reply carries the weight version that computed
it (`done` also lists `weight_versions`, one per generated token).
"""

from __future__ import annotations

import hmac
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from runtime.serve.detok import StreamText
from runtime.serve.healthcheck import HealthChecks
from runtime.serve.peers import Peers
from runtime.serve.protocol import (
    MAX_FRAME_BYTES,
    AbortRequest,
    GenerateRequest,
    ProtocolError,
    TrainLimits,
    TrainRequest,
    decode_frame,
    encode,
    error_reply,
    request_id_of,
    validate_request,
)
from runtime.serve.trainops import TrainOps

__all__ = ["Server"]

MAX_RECV_PER_TURN = 512  # frames taken per loop turn before the scheduler steps again
SHUTDOWN_LINGER_MS = 2000  # how long the last replies (errors after a failed step included) may take to leave


@dataclass
class _Active:
    envelope: list[bytes]
    request_id: str
    req: GenerateRequest
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # weight version of each generated token
    text: StreamText | None = None  # streamed text of a prompt request (runtime/serve/detok.py)


class Server:
    """`Server(scheduler, bind=...)`; `serve_forever()` or `start()` in a thread; `endpoint` is the bound address.

    `scheduler` is a `runtime.sched.Scheduler` (its engine serves; its work, if any, trains); `tokenizer`
    (optional) turns `prompt` strings into ids and generated ids into `text`. The limits are the `[serve]`
    keys of the same names (docs/config.md); `Server.from_config` takes them from a job config.
    """

    def __init__(
        self,
        scheduler,
        *,
        bind: str = "tcp://127.0.0.1:5555",
        max_queue: int = 1024,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tokenizer=None,
        info: dict | None = None,
        context: zmq.Context | None = None,
        max_queue_per_client: int = 256,
        max_priority: int = 1000,
        health_timeout_s: float = 30.0,
        client_timeout_s: float = 10.0,
        train_limits: TrainLimits | None = None,
        max_train_queue_bytes: int = 256 << 20,
        curve_secret_key_file: str = "",
        curve_authorized_dir: str = "",
    ) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.max_queue, self.max_queue_per_client = max_queue, max_queue_per_client
        self.max_priority = max_priority
        self.max_frame_bytes = max_frame_bytes
        self.train_ops = TrainOps(train_limits or TrainLimits(), max_train_queue_bytes)
        self.tokenizer = tokenizer
        self.extra_info = info or {}
        # Curve's ZAP handler is per context: a Curve server gets a context of its own
        self._own_ctx = context is None and bool(curve_secret_key_file)
        self.ctx = zmq.Context() if self._own_ctx else (context or zmq.Context.instance())
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 8 * max_frame_bytes + 4096)  # hard bound: peer is dropped
        self.sock.setsockopt(zmq.RCVHWM, 10000)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        if client_timeout_s > 0:  # ZMTP pings: a peer silent for client_timeout_s is disconnected
            half = max(1, int(client_timeout_s * 500))
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, half)
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, half)
        self.auth = self.peers = None
        self.curve = bool(curve_secret_key_file)
        try:
            if self.curve:
                from runtime.serve.curve import secure_server

                self.auth = secure_server(self.sock, self.ctx, curve_secret_key_file, curve_authorized_dir)
            self.peers = Peers(self.sock)
            self.sock.bind(bind)
        except Exception:  # a bad key file, an address in use: nothing left open
            self._close(0)
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.active: dict[str, _Active] = {}  # by engine key
        self.by_conn: dict[bytes, set[str]] = {}  # connection identity -> its engine keys
        self._frame: zmq.Frame | None = None  # the frame being handled (its connection is watched)
        self.health = HealthChecks(self.engine, self._send, self._health_status, timeout_s=health_timeout_s,
                                   max_waiting=max_queue, max_per_connection=max_queue_per_client)
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self.shutdown: dict[str, Any] = {}  # after a requested stop: what was refused, what was saved
        self._thread: threading.Thread | None = None
        self.started = time.time()

    @classmethod
    def from_config(cls, scheduler, serve: dict, **kw) -> Server:
        """A server with the limits of a job config's `[serve]` section (`kw`: bind, tokenizer, info, ...)."""
        limits = TrainLimits(serve["max_train_rows"], serve["max_train_tokens"], serve["max_train_batch_bytes"])
        kw.setdefault("bind", serve["bind"])
        return cls(scheduler, max_queue=serve["max_queue"], max_queue_per_client=serve["max_queue_per_client"],
                   max_priority=serve["max_priority"], health_timeout_s=serve["health_timeout_s"],
                   client_timeout_s=serve["client_timeout_s"], train_limits=limits,
                   max_train_queue_bytes=serve["max_train_queue_bytes"],
                   curve_secret_key_file=serve["curve_secret_key_file"],
                   curve_authorized_dir=serve["curve_authorized_dir"], **kw)

    @property
    def weight_version(self) -> int:
        return self.scheduler.weights.version

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="moerun-server", daemon=True)
        self._thread.start()
        return self

    def request_stop(self, reason: str | None = None) -> None:
        """Ask the loop to end after the current turn (safe from a signal handler or another thread)."""
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.peers.monitor, zmq.POLLIN)
        failed = False
        try:
            while not self._stop.is_set():
                busy = self.scheduler.has_work()
                if dict(poller.poll(0 if busy else 50)).get(self.sock):
                    for _ in range(MAX_RECV_PER_TURN):
                        try:
                            parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(parts)
                for conn in self.peers.departed(time.monotonic()):
                    self._drop_connection(conn)
                if self.health.waiters:  # a health check is in flight
                    self.health.expire()
                if self.scheduler.has_work():
                    self._step()
                else:
                    self.scheduler.keepalive()
            self._shut_down()
        except BaseException:
            failed = True  # the other ranks may be mid-step: no STOP header, the mesh ends the job
            raise
        finally:
            try:
                if not failed:
                    self.scheduler.stop()
            finally:
                self._close(SHUTDOWN_LINGER_MS)

    def _close(self, linger_ms: int) -> None:
        """Close the socket (`linger_ms` lets the replies already queued leave)."""
        if self.peers is not None:
            self.peers.close()
        self.sock.close(linger=linger_ms)
        if self.auth is not None:
            self.auth.stop()
        if self._own_ctx:
            self.ctx.term()

    def _shut_down(self) -> None:
        """After a requested stop (the step in flight has ended): answer every request still waiting
        (generate, health, queued training and `save` ops, frames not read yet) with `unavailable`, then
        let the scheduler checkpoint any update not yet saved, on every rank."""
        msg = (f"the server is stopping ({self.stop_reason or 'asked to'}); this request was not completed: "
               "retry on a running server")
        n = len(self.active) + len(self.health)
        self._fail_in_flight(msg, "unavailable")
        if self.scheduler.work is not None:
            n += len(self.scheduler.work.saves) + sum(i.on_done is not None for i in self.scheduler.work.queue)
        self.shutdown = {"refused": n, "saved": self.scheduler.shut_down(msg)}
        for _ in range(MAX_RECV_PER_TURN):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                request_id = request_id_of(decode_frame(parts[-1], self.max_frame_bytes))
            except ProtocolError:
                request_id = None
            envelope = parts[:2] if len(parts) == 3 and parts[1] == b"" else parts[:1]
            self._send(envelope, error_reply("unavailable", msg, request_id))
            self.shutdown["refused"] += 1

    # --- requests -------------------------------------------------------------------------------------
    def _send(self, envelope: list[bytes], msg: dict) -> None:
        self.sock.send_multipart([*envelope, encode(msg)])

    def _handle(self, parts: list[zmq.Frame]) -> None:
        if len(parts) == 2:
            envelope, frame = [parts[0].bytes], parts[1]
        elif len(parts) == 3 and parts[1].bytes == b"":  # a REQ peer's envelope
            envelope, frame = [parts[0].bytes, b""], parts[2]
        else:
            self._send([parts[0].bytes], error_reply("bad_request",
                                                     f"expected one frame per message, got {len(parts) - 1}"))
            return
        request_id = None
        self._frame = frame
        try:
            msg = decode_frame(frame.bytes, self.max_frame_bytes)
            request_id = request_id_of(msg)
            op, payload = validate_request(
                msg, vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len
            )
            getattr(self, f"_op_{op}")(envelope, payload)
        except ProtocolError as e:
            self.engine.metrics.inc("errors_total")
            rid = e.request_id if e.request_id is not None else request_id
            self._send(envelope, error_reply(e.code, e.message, rid))
        except Exception as e:  # never let one request take the server down
            self.engine.metrics.inc("errors_total")
            self._send(envelope, error_reply("internal", f"{type(e).__name__}: {e}", request_id))

    @staticmethod
    def _key(envelope: list[bytes], request_id: str) -> str:
        return envelope[0].hex() + ":" + request_id

    def _op_generate(self, envelope: list[bytes], req: GenerateRequest) -> None:
        from runtime.serve.engine import EngineError
        from runtime.serve.step import SamplingParams

        key = self._key(envelope, req.id)
        if key in self.active:
            raise ProtocolError("bad_request", f"request id {req.id!r} is already active on this connection",
                                req.id)
        if abs(req.priority) > self.max_priority:
            raise ProtocolError("bad_request", f"priority {req.priority} is outside [-{self.max_priority}, "
                                f"{self.max_priority}] (serve.max_priority)", req.id)
        conn = envelope[0]
        mine = len(self.by_conn.get(conn, ()))
        if mine >= self.max_queue_per_client:
            raise ProtocolError("queue_full", f"this connection has {mine} requests in flight "
                                f"(serve.max_queue_per_client = {self.max_queue_per_client}); wait for some to "
                                "finish", req.id)
        if len(self.engine.waiting) >= self.max_queue:
            raise ProtocolError("queue_full", f"{len(self.engine.waiting)} requests are waiting "
                                f"(serve.max_queue = {self.max_queue}); retry later", req.id)
        ids = req.prompt_ids
        if ids is None:
            if self.tokenizer is None:
                raise ProtocolError("bad_request", "this model has no tokenizer: send prompt_ids", req.id)
            ids = self.tokenizer.encode(req.prompt, add_bos=getattr(self.tokenizer, "bos_id", None) is not None)
        params = SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed, stop_ids=list(req.stop_ids), logprobs=req.logprobs, ignore_eos=req.ignore_eos,
        )
        try:
            self.engine.add_request(key, ids, params, req.priority, owner=conn.hex())
        except EngineError as e:
            raise ProtocolError(e.code, str(e), req.id) from None
        if not self.peers.watch(conn, self._frame):  # the client left before its request was read
            self.engine.abort(key)
            return
        text = StreamText(self.tokenizer) if req.stream and req.prompt is not None and self.tokenizer else None
        self.active[key] = _Active(envelope, req.id, req, text=text)
        self.by_conn.setdefault(conn, set()).add(key)

    def _op_abort(self, envelope: list[bytes], req: AbortRequest) -> None:
        """Abort a request of this connection, or of another one when `abort_key` matches the key its
        generate chose. Any other case gets the same answer as an unknown id (nothing is confirmed)."""
        key = self._key(envelope, req.id)
        if key not in self.active and req.abort_key is not None:
            given = req.abort_key.encode()
            for k, a in self.active.items():
                if a.request_id == req.id and a.req.abort_key is not None and \
                        hmac.compare_digest(a.req.abort_key.encode(), given):
                    key = k
                    self._send(envelope, {"op": "aborted", "id": req.id})
                    break
        if key not in self.active:
            raise ProtocolError("bad_request", f"no active request with id {req.id!r} on this connection", req.id)
        out = self.engine.abort(key)
        if out is not None:
            self._deliver(out)

    def _untrack(self, key: str, conn: bytes) -> None:
        keys = self.by_conn.get(conn)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_conn[conn]
                self.peers.forget(conn)

    def _drop_connection(self, conn: bytes) -> None:
        """A client went away: end its requests (no reply: nobody reads it) and give their pages back."""
        for key in self.by_conn.pop(conn, set()):
            self.active.pop(key, None)
            self.engine.abort(key)
        self.peers.forget(conn)
        self.engine.metrics.inc("clients_departed_total")

    def _op_health(self, envelope: list[bytes], request_id: str | None) -> None:
        """A real one-token generation through the engine; replies when it is done (runtime.serve.healthcheck)."""
        self.health.add(envelope, request_id)

    def _op_info(self, envelope: list[bytes], request_id: str | None) -> None:
        self._send(envelope, self._with_id({"op": "info", **self.info()}, request_id))

    def _op_metrics(self, envelope: list[bytes], request_id: str | None) -> None:
        m = self.engine.metrics
        self._send(envelope, self._with_id(
            {"op": "metrics", "metrics": m.as_dict(), "prometheus": m.prometheus()}, request_id))

    def _op_train(self, envelope: list[bytes], req: TrainRequest) -> None:
        self.train_ops.submit(self.scheduler.work, envelope, req, self._send)

    def _op_save(self, envelope: list[bytes], request_id: str | None) -> None:
        self.train_ops.save(self.scheduler.work, envelope, request_id, self._send, max_waiting=self.max_queue)

    @staticmethod
    def _with_id(msg: dict, request_id: str | None) -> dict:
        if request_id is not None:
            msg["id"] = request_id
        return msg

    def info(self) -> dict[str, Any]:
        import msgpack
        import torch

        e = self.engine
        cfg = e.model.config
        return {
            "model": self.extra_info.get("model", "unknown"),
            "model_type": getattr(cfg, "model_type", None),
            "layout": self.extra_info.get("layout", {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "world": 1}),
            "versions": {
                "moerun": self.extra_info.get("version", "0"), "torch": torch.__version__,
                "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                "msgpack": ".".join(map(str, msgpack.version)), "python": platform.python_version(),
            },
            "vocab_size": e.vocab_size,
            "max_model_len": e.max_model_len,
            "max_batch": e.max_batch,
            "max_queue": self.max_queue,
            "max_queue_per_client": self.max_queue_per_client,
            "max_priority": self.max_priority,
            "max_prefill_tokens": e.max_prefill_tokens,
            "kv_cache": {
                "page_size": e.page_size, "pages": e.cache.num_pages,
                "tokens": e.cache.num_pages * e.page_size,
                "values_per_token_per_layer": e.cache.width,
                "bytes_per_token_per_layer": e.cache.bytes_per_token_per_layer,
                "dtype": str(e.cache.kv.dtype).removeprefix("torch."),
            },
            "tokenizer": self.tokenizer is not None,
            "training": self.scheduler.work is not None,
            "curve": self.curve,
            "weight_version": self.weight_version,
            "uptime_s": time.time() - self.started,
        }

    # --- scheduler steps --------------------------------------------------------------------------------
    def _step(self) -> None:
        from runtime.sched.scheduler import Kind

        try:
            kind, outputs = self.scheduler.step()
        except Exception as exc:
            msg = f"step failed: {type(exc).__name__}: {exc}"
            self._fail_in_flight(msg)
            if self.scheduler.work is not None:
                self.scheduler.work.fail_all(msg)
            if self.scheduler.group is not None:
                raise  # other ranks may be mid-step: going on would desynchronise them; the job ends
            return
        if kind == Kind.SERVE:
            for out in outputs:
                self._deliver(out)

    def _fail_in_flight(self, msg: str, code: str = "internal") -> None:
        """After a failed step (or when stopping): end every request in the engine and every waiting health
        check with an error `code` carrying `msg`. State first, replies after: whoever reads a reply finds
        the server already clean."""
        ended = []
        for key in list(self.engine.requests):
            self.engine.abort(key)
            act = self.active.pop(key, None)
            if act is not None:
                ended.append((act.envelope, act.request_id))
        for conn in self.by_conn:
            self.peers.forget(conn)
        self.by_conn.clear()
        self.health.fail(code, msg)
        for envelope, request_id in ended:
            self._send(envelope, error_reply(code, msg, request_id))

    def _deliver(self, out) -> None:
        if self.health.key is not None and self.health.deliver(out):
            return
        act = self.active.get(out.key)
        if act is None:
            return
        if out.error is not None:  # this request alone failed (e.g. its sampling)
            del self.active[out.key]
            self._untrack(out.key, act.envelope[0])
            self.engine.metrics.inc("errors_total")
            self._send(act.envelope, error_reply("internal", out.error, act.request_id))
            return
        version = self.weight_version
        act.ids.extend(out.ids)
        act.versions.extend([version] * len(out.ids))
        lp = act.req.logprobs > 0
        if lp and out.logprobs:
            act.logprobs.extend(out.logprobs)
            act.top_logprobs.extend(out.top_logprobs)
        text = None
        if act.text is not None:  # never a split character; the chunks add up to done's text
            text = act.text.push(out.ids) + (act.text.finish() if out.finished else "")
        if act.req.stream and (out.ids or text):
            msg = {"op": "token", "id": act.request_id, "ids": out.ids, "weight_version": version}
            if lp:
                msg["logprobs"], msg["top_logprobs"] = out.logprobs, out.top_logprobs
            if text is not None:
                msg["text"] = text
            self._send(act.envelope, msg)
        if out.finished:
            del self.active[out.key]
            self._untrack(out.key, act.envelope[0])
            done = {
                "op": "done", "id": act.request_id, "ids": act.ids, "finish_reason": out.finish_reason,
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(act.ids),
                          "cached_tokens": out.cached_tokens},
                "weight_version": version, "weight_versions": act.versions,
            }
            if lp:
                done["logprobs"], done["top_logprobs"] = act.logprobs, act.top_logprobs
            if act.text is not None:
                done["text"] = act.text.text
            elif act.req.prompt is not None and self.tokenizer is not None:
                done["text"] = self.tokenizer.decode(act.ids)
            self._send(act.envelope, done)

    def _health_status(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting),
                "weight_version": self.weight_version}
