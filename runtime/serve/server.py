"""ZeroMQ ROUTER server in front of the serving engine (one thread: receive, validate, step, reply).

Loopback by default. Frames are msgpack maps (never pickle), validated by `runtime.serve.protocol` before they
reach the engine; every problem gets an `error` reply and the loop goes on. Memory stays bounded: frames
above the soft bound get `bad_request` (above a hard bound ZeroMQ drops the sender), at most
`serve.max_queue` requests wait, a request's outputs are bounded by its max_tokens, and socket queues have
high-water marks. Request ids are per connection: the engine key is (peer identity, id).
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from runtime.serve.protocol import (
    MAX_FRAME_BYTES,
    GenerateRequest,
    ProtocolError,
    decode_frame,
    encode,
    error_reply,
    validate_request,
)

__all__ = ["Server"]

MAX_RECV_PER_TURN = 512  # frames taken per loop turn before the engine steps again
HEALTH_TIMEOUT_S = 60.0


@dataclass
class _Active:
    envelope: list[bytes]
    cid: str  # client's id
    req: GenerateRequest
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)


class Server:
    """`Server(engine, bind=...)`; `serve_forever()` or `start()` in a thread; `endpoint` is the bound address.

    `engine` is a `runtime.serve.Engine`; `tokenizer` (optional) turns `prompt` strings into ids.
    """

    def __init__(
        self,
        engine,
        *,
        bind: str = "tcp://127.0.0.1:5555",
        max_queue: int = 1024,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tokenizer=None,
        info: dict | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_frame_bytes = max_frame_bytes
        self.tokenizer = tokenizer
        self.extra_info = info or {}
        self.weight_version = 0
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 8 * max_frame_bytes + 4096)  # hard bound: peer is dropped
        self.sock.setsockopt(zmq.RCVHWM, 10000)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.active: dict[str, _Active] = {}
        self._health_waiters: list[tuple[list[bytes], str | None, float]] = []
        self._health_rid: str | None = None
        self._health_n = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_idle = None  # called about every 50 ms while there is nothing to do (multi-rank keep-alive)
        self.started = time.time()

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="moerun-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                busy = self._busy()
                if dict(poller.poll(0 if busy else 50)).get(self.sock):
                    for _ in range(MAX_RECV_PER_TURN):
                        try:
                            parts = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(parts)
                self._turn(busy)
        finally:
            self._close()

    # the loop's three hooks (CoServer runs the shared scheduler in them)
    def _busy(self) -> bool:
        return self.engine.has_work()

    def _turn(self, busy: bool) -> None:
        """After the turn's messages: one engine step if there is work, else the idle hook."""
        if self.engine.has_work():
            self._step()
        elif self.on_idle is not None:
            self.on_idle()

    def _close(self) -> None:
        self.sock.close(0)

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
        rid = None
        try:
            msg = decode_frame(frame, self.max_frame_bytes)
            rid = msg.get("id") if isinstance(msg.get("id"), str) and len(msg["id"]) <= 256 else None
            op, payload = validate_request(
                msg, vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len
            )
            getattr(self, f"_op_{op}")(envelope, payload)
        except ProtocolError as e:
            self.engine.metrics.inc("errors_total")
            self._send(envelope, error_reply(e.code, e.message, e.rid if e.rid is not None else rid))
        except Exception as e:  # never let one request take the server down
            self.engine.metrics.inc("errors_total")
            self._send(envelope, error_reply("internal", f"{type(e).__name__}: {e}", rid))

    def _key(self, envelope: list[bytes], cid: str) -> str:
        return envelope[0].hex() + ":" + cid

    def _op_generate(self, envelope: list[bytes], req: GenerateRequest) -> None:
        from runtime.serve.engine import EngineError
        from runtime.serve.sampling import SamplingParams

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
        self.active[key] = _Active(envelope, req.id, req)

    def _op_abort(self, envelope: list[bytes], cid: str) -> None:
        key = self._key(envelope, cid)
        if key not in self.active:
            # Another connection's request (e.g. `moerun client abort`): only when the id is unambiguous.
            others = [k for k, a in self.active.items() if a.cid == cid]
            if len(others) != 1:
                why = "no active request" if not others else f"{len(others)} active requests"
                raise ProtocolError("bad_request", f"{why} with id {cid!r}", cid)
            key = others[0]
            if envelope != self.active[key].envelope:
                self._send(envelope, {"op": "aborted", "id": cid})
        out = self.engine.abort(key)
        if out is not None:
            self._deliver(out)

    def _op_health(self, envelope: list[bytes], cid: str | None) -> None:
        """A real one-token generation through the engine; replies when it is done."""
        from runtime.serve.sampling import SamplingParams

        if len(self._health_waiters) >= self.max_queue:
            raise ProtocolError("queue_full", "too many health checks in flight", cid)
        self._health_waiters.append((envelope, cid, time.perf_counter()))
        if self._health_rid is None:
            self._health_n += 1
            self._health_rid = f"health:{self._health_n}"
            bos = self.engine.model.config.bos_token_id
            prompt = [bos if isinstance(bos, int) and 0 <= bos < self.engine.vocab_size else 0]
            self.engine.add_request(self._health_rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                                    priority=2**31 - 1)

    def _op_info(self, envelope: list[bytes], cid: str | None) -> None:
        self._send(envelope, self._with_id({"op": "info", **self.info()}, cid))

    def _op_metrics(self, envelope: list[bytes], cid: str | None) -> None:
        m = self.engine.metrics
        self._send(envelope, self._with_id(
            {"op": "metrics", "metrics": m.as_dict(), "prometheus": m.prometheus()}, cid))

    @staticmethod
    def _with_id(msg: dict, cid: str | None) -> dict:
        if cid is not None:
            msg["id"] = cid
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
            "weight_version": self.weight_version,
            "uptime_s": time.time() - self.started,
        }

    # --- engine steps -----------------------------------------------------------------------------------
    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step: fail everyone in flight, keep serving
            self._fail_in_flight(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        for out in outputs:
            self._deliver(out)

    def _fail_in_flight(self, msg: str) -> None:
        """After a failed step: end every request in the engine and every waiting health check with an
        `internal` error carrying `msg`. State first, replies after: whoever reads a reply finds the server
        already clean."""
        ended = []
        for key in list(self.engine.requests):
            self.engine.abort(key)
            act = self.active.pop(key, None)
            if act is not None:
                ended.append((act.envelope, act.cid))
        waiters, self._health_waiters, self._health_rid = self._health_waiters, [], None
        for envelope, cid in ended:
            self._send(envelope, error_reply("internal", msg, cid))
        for envelope, cid, _ in waiters:
            self._send(envelope, self._with_id(error_reply("internal", msg), cid))

    def _deliver(self, out) -> None:
        if out.rid == self._health_rid:
            if out.finished:
                ok = len(out.ids) == 1 or out.completion_tokens == 1
                now = time.perf_counter()
                waiters, self._health_waiters, self._health_rid = self._health_waiters, [], None
                for envelope, cid, t0 in waiters:
                    self._send(envelope, self._with_id(
                        {"op": "health", "ok": ok, "status": "ok" if ok else "degraded",
                         "latency_s": now - t0, "running": len(self.engine.running),
                         "waiting": len(self.engine.waiting), "weight_version": self.weight_version}, cid))
            return
        act = self.active.get(out.rid)
        if act is None:
            return
        act.ids.extend(out.ids)
        lp = act.req.logprobs > 0
        if lp and out.logprobs:
            act.logprobs.extend(out.logprobs)
            act.top_logprobs.extend(out.top_logprobs)
        if act.req.stream and out.ids:
            msg = {"op": "token", "id": act.cid, "ids": out.ids, "weight_version": self.weight_version}
            if lp:
                msg["logprobs"], msg["top_logprobs"] = out.logprobs, out.top_logprobs
            if act.req.prompt is not None and self.tokenizer is not None:
                msg["text"] = self.tokenizer.decode(out.ids)
            self._send(act.envelope, msg)
        if out.finished:
            del self.active[out.rid]
            done = {
                "op": "done", "id": act.cid, "ids": act.ids, "finish_reason": out.finish_reason,
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(act.ids),
                          "cached_tokens": out.cached_tokens},
                "weight_version": self.weight_version,
            }
            if lp:
                done["logprobs"], done["top_logprobs"] = act.logprobs, act.top_logprobs
            if act.req.prompt is not None and self.tokenizer is not None:
                done["text"] = self.tokenizer.decode(act.ids)
            self._send(act.envelope, done)
