"""The ZeroMQ ROUTER server: one thread receives, validates, asks the shared scheduler for a step, replies.

There is one serving loop for every way of serving: the server always drives a `runtime.sched.Scheduler`,
whose training side is empty unless the job trains (`moerun serve --train`), on one rank or on the driver
rank of many. Loopback by default. Frames are msgpack maps (never pickle), validated by
`runtime.serve.protocol` before they reach the engine; every problem gets an `error` reply and the loop goes
on. Memory stays bounded: frames above the soft bound get `bad_request` (above a hard bound ZeroMQ drops the
sender), at most `serve.max_queue` requests wait, a request's outputs are bounded by its max_tokens, and
socket queues have high-water marks.

Request ids are per connection: the wire `id` is the client's `request_id`; the engine is keyed by
`key` = connection identity + ":" + request_id. Every token reply carries the weight version that computed
it (`done` also lists `weight_versions`, one per generated token).
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from runtime.serve.detok import StreamText
from runtime.serve.protocol import (
    MAX_FRAME_BYTES,
    GenerateRequest,
    ProtocolError,
    TrainRequest,
    decode_frame,
    encode,
    error_reply,
    request_id_of,
    validate_request,
)

__all__ = ["Server", "MAX_TRAIN_QUEUE"]

MAX_RECV_PER_TURN = 512  # frames taken per loop turn before the scheduler steps again
SHUTDOWN_LINGER_MS = 2000  # how long the last replies may take to leave when the server stops
MAX_TRAIN_QUEUE = 256  # queued train ops at most (each holds its batch)
HEALTH_PRIORITY = 2**31 - 1


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
    (optional) turns `prompt` strings into ids and generated ids into `text`.
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
    ) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.max_queue = max_queue
        self.max_frame_bytes = max_frame_bytes
        self.tokenizer = tokenizer
        self.extra_info = info or {}
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 8 * max_frame_bytes + 4096)  # hard bound: peer is dropped
        self.sock.setsockopt(zmq.RCVHWM, 10000)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.active: dict[str, _Active] = {}  # by engine key
        self._health_waiters: list[tuple[list[bytes], str | None, float]] = []
        self._health_key: str | None = None
        self._health_n = 0
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self.shutdown: dict[str, Any] = {}  # after a requested stop: what was refused, what was saved
        self._thread: threading.Thread | None = None
        self.started = time.time()

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
        try:
            while not self._stop.is_set():
                busy = self.scheduler.has_work()
                if dict(poller.poll(0 if busy else 50)).get(self.sock):
                    for _ in range(MAX_RECV_PER_TURN):
                        try:
                            parts = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(parts)
                if self.scheduler.has_work():
                    self._step()
                else:
                    self.scheduler.keepalive()
            self._shut_down()
        finally:
            try:
                self.scheduler.stop()
            finally:
                self.sock.close(SHUTDOWN_LINGER_MS)

    def _shut_down(self) -> None:
        """After a requested stop (the step in flight has ended): answer every request still waiting
        (generate, health, queued training and `save` ops, frames not read yet) with `unavailable`, then
        let the scheduler checkpoint any update not yet saved, on every rank."""
        msg = (f"the server is stopping ({self.stop_reason or 'asked to'}); this request was not completed: "
               "retry on a running server")
        n = len(self.active) + len(self._health_waiters)
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

    def _handle(self, parts: list[bytes]) -> None:
        if len(parts) == 2:
            envelope, frame = parts[:1], parts[1]
        elif len(parts) == 3 and parts[1] == b"":  # a REQ peer's envelope
            envelope, frame = parts[:2], parts[2]
        else:
            self._send(parts[:1], error_reply("bad_request", f"expected one frame per message, got {len(parts) - 1}"))
            return
        request_id = None
        try:
            msg = decode_frame(frame, self.max_frame_bytes)
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
            self.engine.add_request(key, ids, params, req.priority)
        except EngineError as e:
            raise ProtocolError(e.code, str(e), req.id) from None
        text = StreamText(self.tokenizer) if req.stream and req.prompt is not None and self.tokenizer else None
        self.active[key] = _Active(envelope, req.id, req, text=text)

    def _op_abort(self, envelope: list[bytes], request_id: str) -> None:
        key = self._key(envelope, request_id)
        if key not in self.active:
            # Another connection's request (e.g. `moerun client abort`): only when the id is unambiguous.
            others = [k for k, a in self.active.items() if a.request_id == request_id]
            if len(others) != 1:
                why = "no active request" if not others else f"{len(others)} active requests"
                raise ProtocolError("bad_request", f"{why} with id {request_id!r}", request_id)
            key = others[0]
            if envelope != self.active[key].envelope:
                self._send(envelope, {"op": "aborted", "id": request_id})
        out = self.engine.abort(key)
        if out is not None:
            self._deliver(out)

    def _op_health(self, envelope: list[bytes], request_id: str | None) -> None:
        """A real one-token generation through the engine; replies when it is done."""
        from runtime.serve.step import SamplingParams

        if len(self._health_waiters) >= self.max_queue:
            raise ProtocolError("queue_full", "too many health checks in flight", request_id)
        self._health_waiters.append((envelope, request_id, time.perf_counter()))
        if self._health_key is None:
            self._health_n += 1
            self._health_key = f"health:{self._health_n}"
            bos = self.engine.model.config.bos_token_id
            prompt = [bos if isinstance(bos, int) and 0 <= bos < self.engine.vocab_size else 0]
            self.engine.add_request(self._health_key, prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                                    priority=HEALTH_PRIORITY, probe=True)

    def _op_info(self, envelope: list[bytes], request_id: str | None) -> None:
        self._send(envelope, self._with_id({"op": "info", **self.info()}, request_id))

    def _op_metrics(self, envelope: list[bytes], request_id: str | None) -> None:
        m = self.engine.metrics
        self._send(envelope, self._with_id(
            {"op": "metrics", "metrics": m.as_dict(), "prometheus": m.prometheus()}, request_id))

    def _op_train(self, envelope: list[bytes], req: TrainRequest) -> None:
        from runtime.sched.rl import RLBatch

        work = self.scheduler.work
        if work is None:
            raise ProtocolError("bad_request", "this server does not train: start it with `moerun serve "
                                "--train` (or give the Scheduler a TrainWork)", req.id)
        why = work.supports(req.loss, req.kl_coef)
        if why is not None:
            raise ProtocolError("bad_request", why, req.id)
        if len(work.queue) >= MAX_TRAIN_QUEUE:
            raise ProtocolError("queue_full", f"{len(work.queue)} training steps are queued; retry later", req.id)
        batch = RLBatch.from_lists(req.input_ids, req.loss_mask, req.advantages, req.old_logprobs, req.loss,
                                   req.kl_coef)

        def done(result: dict) -> None:
            if "error" in result:
                self._send(envelope, error_reply(result.get("code", "internal"), result["error"], req.id))
            else:
                self._send(envelope, {"op": "trained", "id": req.id, **result})

        work.submit(batch, req.optimizer_step, done)

    def _op_save(self, envelope: list[bytes], request_id: str | None) -> None:
        """A checkpoint of the weights as they are, written by every rank at the next step."""
        work = self.scheduler.work
        if work is None:
            raise ProtocolError("bad_request", "this server does not train: nothing to save (start it with "
                                "`moerun serve --train`)", request_id)
        if len(work.saves) >= self.max_queue:
            raise ProtocolError("queue_full", "too many save ops waiting", request_id)

        def done(result: dict) -> None:
            if "error" in result:
                self._send(envelope, error_reply(result.get("code", "internal"), result["error"], request_id))
            else:
                self._send(envelope, self._with_id({"op": "saved", **result}, request_id))

        work.request_save(done)

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
        waiters, self._health_waiters, self._health_key = self._health_waiters, [], None
        for envelope, request_id in ended:
            self._send(envelope, error_reply(code, msg, request_id))
        for envelope, request_id, _ in waiters:
            self._send(envelope, self._with_id(error_reply(code, msg), request_id))

    def _deliver(self, out) -> None:
        if out.key == self._health_key:
            if out.finished:
                self._answer_health(len(out.ids) == 1 or out.completion_tokens == 1)
            return
        act = self.active.get(out.key)
        if act is None:
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

    def _answer_health(self, ok: bool) -> None:
        now = time.perf_counter()
        waiters, self._health_waiters, self._health_key = self._health_waiters, [], None
        self.engine.metrics.inc("health_checks_total", len(waiters))
        for envelope, request_id, t0 in waiters:
            self._send(envelope, self._with_id(
                {"op": "health", "ok": ok, "status": "ok" if ok else "degraded", "latency_s": now - t0,
                 "running": len(self.engine.running), "waiting": len(self.engine.waiting),
                 "weight_version": self.weight_version}, request_id))
