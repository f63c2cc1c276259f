"""The server's `health` op (docs/protocol.md): a real one-token generation through the engine.

The check runs at a priority above every client's (clients: at most `serve.max_priority`) and is a probe
(kept out of the traffic metrics). Concurrent checks share one generation. A check that has not finished
within `timeout_s` is answered `ok: false, status: timeout` and its generation is taken back, so a stuck
engine makes `moerun client health` fail instead of hang. Waiting checks are bounded in all and per
connection, as requests are.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.serve.protocol import ProtocolError, error_reply

__all__ = ["HEALTH_PRIORITY", "HealthChecks"]

HEALTH_PRIORITY = 2**31 - 1  # above every client's


class HealthChecks:
    """Waiting `health` ops of one server. `send(envelope, reply)` answers; `status()` gives the fields a
    health reply carries besides ok/status/latency (running, waiting, weight_version)."""

    def __init__(self, engine, send: Callable[[list[bytes], dict], None], status: Callable[[], dict], *,
                 timeout_s: float, max_waiting: int, max_per_connection: int) -> None:
        self.engine, self.send, self.status = engine, send, status
        self.timeout_s, self.max_waiting, self.max_per_connection = timeout_s, max_waiting, max_per_connection
        self.waiters: list[tuple[list[bytes], str | None, float]] = []  # (envelope, id, since)
        self.key: str | None = None  # the engine key of the generation in flight
        self._n = 0

    def __len__(self) -> int:
        return len(self.waiters)

    def add(self, envelope: list[bytes], request_id: str | None) -> None:
        """A new check: it waits for the generation in flight, or starts one. ProtocolError when too many
        checks wait."""
        from runtime.serve.step import SamplingParams

        if len(self.waiters) >= self.max_waiting:
            raise ProtocolError("queue_full", "too many health checks in flight", request_id)
        if sum(w[0][0] == envelope[0] for w in self.waiters) >= self.max_per_connection:
            raise ProtocolError("queue_full", "too many health checks in flight on this connection "
                                f"(serve.max_queue_per_client = {self.max_per_connection})", request_id)
        self.waiters.append((envelope, request_id, time.perf_counter()))
        if self.key is None:
            self._n += 1
            self.key = f"health:{self._n}"
            bos = self.engine.model.config.bos_token_id
            prompt = [bos if isinstance(bos, int) and 0 <= bos < self.engine.vocab_size else 0]
            self.engine.add_request(self.key, prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                                    priority=HEALTH_PRIORITY, probe=True)

    def deliver(self, out) -> bool:
        """Take an engine output if it is the check's generation (True); answer the checks when it is done."""
        if self.key is None or out.key != self.key:
            return False
        if out.finished:
            self.answer(len(out.ids) == 1 or out.completion_tokens == 1)
        return True

    def expire(self) -> None:
        """Checks waiting longer than `timeout_s` are answered `ok: false, status: timeout` (their generation
        is taken back); the next check starts afresh."""
        if self.waiters and time.perf_counter() - self.waiters[0][2] > self.timeout_s:
            if self.key is not None:
                self.engine.abort(self.key)
            self.answer(False, "timeout")

    def answer(self, ok: bool, status: str | None = None) -> None:
        now = time.perf_counter()
        waiters, self.waiters, self.key = self.waiters, [], None
        self.engine.metrics.inc("health_checks_total", len(waiters))
        extra = self.status()
        for envelope, request_id, t0 in waiters:
            reply = {"op": "health", "ok": ok, "status": status or ("ok" if ok else "degraded"),
                     "latency_s": now - t0, **extra}
            if request_id is not None:
                reply["id"] = request_id
            self.send(envelope, reply)

    def fail(self, code: str, message: str) -> None:
        """End every waiting check with an error (after a failed step, or when the server stops); the
        generation itself is the caller's to end with the engine's other requests."""
        waiters, self.waiters, self.key = self.waiters, [], None
        for envelope, request_id, _ in waiters:
            reply = error_reply(code, message)
            if request_id is not None:
                reply["id"] = request_id
            self.send(envelope, reply)
