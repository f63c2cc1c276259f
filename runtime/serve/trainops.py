"""The server's `train` ops, bounded and idempotent by id, and its `save` ops (docs/protocol.md, "Training over
ZeroMQ").

Bounds: one op's rows, tokens and padded batch bytes (`protocol.TrainLimits`, the `serve.max_train_*`
keys), and the bytes of the batches queued (`serve.max_train_queue_bytes`, at most `MAX_TRAIN_QUEUE`
queued steps). Idempotency: a retry of an op that was applied returns its first result and applies nothing.

An op is known by its `id` and a digest of its content. The first op with an id runs; while it is queued
or running, a retry with the same id and content waits for the same result; once it has been applied, a
retry gets that result again (with `"duplicate": true`). The same id with different content is refused, so
two clients that happen to pick the same id never have one's op silently dropped. An op that failed
(`internal`, nothing applied) is forgotten: its retry runs. Results are kept for the last `keep` ops, in
memory (a restarted server does not remember them).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from runtime.serve.protocol import ProtocolError, TrainLimits, TrainRequest, encode, error_reply

__all__ = ["MAX_TRAIN_QUEUE", "TrainLedger", "TrainOps", "digest"]

MAX_TRAIN_QUEUE = 256  # queued training steps at most (each op: one or two)


def digest(req: TrainRequest) -> str:
    """What makes two `train` ops the same op: every field but the id."""
    body = [req.input_ids, req.loss_mask, req.advantages, req.old_logprobs, req.loss, req.optimizer_step,
            req.kl_coef]
    return hashlib.sha256(encode(body)).hexdigest()


class TrainLedger:
    """Pending and applied `train` ops by id. The waiters are opaque (the server's reply envelopes)."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self.pending: dict[str, tuple[str, list]] = {}  # id -> (digest, waiters)
        self.applied: OrderedDict[str, tuple[str, dict]] = OrderedDict()  # id -> (digest, result)

    def _check(self, req_id: str, known: str, now: str) -> None:
        if known != now:
            raise ProtocolError("bad_request", f"train op id {req_id!r} was already used for a different op; "
                                "give every train op its own id", req_id)

    def applied_result(self, req_id: str, dig: str) -> dict | None:
        """The result of an applied op with this id and content (None: not applied)."""
        if req_id in self.applied:
            known, result = self.applied[req_id]
            self._check(req_id, known, dig)
            return result
        return None

    def join(self, req_id: str, dig: str, waiter) -> bool:
        """Wait for a pending op with this id (True), or start one (False: the caller submits it)."""
        if req_id in self.pending:
            known, waiters = self.pending[req_id]
            self._check(req_id, known, dig)
            waiters.append(waiter)
            return True
        self.pending[req_id] = (dig, [waiter])
        return False

    def cancel(self, req_id: str) -> None:
        """The op could not be submitted after all."""
        self.pending.pop(req_id, None)

    def finish(self, req_id: str, result: dict) -> list:
        """Record the op's result (kept unless it is an error); returns its waiters."""
        dig, waiters = self.pending.pop(req_id, ("", []))
        if "error" not in result:
            self.applied[req_id] = (dig, result)
            while len(self.applied) > self.keep:
                self.applied.popitem(last=False)
        return waiters


class TrainOps:
    """Takes `train` ops for a server: checks the bounds, answers retries from the ledger, queues the rest
    on the scheduler's TrainWork and answers every sender of the op when it has run; and `save` ops."""

    def __init__(self, limits: TrainLimits, max_queue_bytes: int) -> None:
        self.limits, self.max_queue_bytes = limits, max_queue_bytes
        self.ledger = TrainLedger()

    def submit(self, work, envelope: list[bytes], req: TrainRequest, send: Callable[[list[bytes], dict], None]
               ) -> None:
        """Queue `req` on `work` (or answer it at once); `send(envelope, reply)` answers. ProtocolError for a
        request that cannot be taken."""
        from runtime.sched.rl import RLBatch

        if work is None:
            raise ProtocolError("bad_request", "this server does not train: start it with `moerun serve "
                                "--train` (or give the Scheduler a TrainWork)", req.id)
        why = work.supports(req.loss, req.kl_coef)
        if why is not None:
            raise ProtocolError("bad_request", why, req.id)
        size = self.limits.check(req)
        dig = digest(req)
        first = self.ledger.applied_result(req.id, dig)
        if first is not None:  # a retry of an applied op: its first result, nothing applied
            send(envelope, {"op": "trained", "id": req.id, **first, "duplicate": True})
            return
        if self.ledger.join(req.id, dig, envelope):
            return  # the same op is queued or running: this sender gets its result too
        queued = work.queued_bytes()
        if len(work.queue) >= MAX_TRAIN_QUEUE or queued + size > self.max_queue_bytes:
            self.ledger.cancel(req.id)
            raise ProtocolError("queue_full", f"{len(work.queue)} training steps ({queued} bytes) are queued "
                                f"(serve.max_train_queue_bytes = {self.max_queue_bytes}); retry later", req.id)
        batch = RLBatch.from_lists(req.input_ids, req.loss_mask, req.advantages, req.old_logprobs, req.loss,
                                   req.kl_coef)

        def done(result: dict) -> None:
            for waiter in self.ledger.finish(req.id, result):
                if "error" in result:  # internal (the step failed) or unavailable (the server stops)
                    send(waiter, error_reply(result.get("code", "internal"), result["error"], req.id))
                else:
                    send(waiter, {"op": "trained", "id": req.id, **result})

        work.submit(batch, req.optimizer_step, done)

    def save(self, work, envelope: list[bytes], request_id: str | None, send: Callable[[list[bytes], dict], None],
             *, max_waiting: int) -> None:
        """A `save` op: a checkpoint of the weights as they are, written by every rank at the next step;
        `send` answers `saved` (path, step, weight_version) or the error (a full disk: nothing is lost but
        the file)."""
        if work is None:
            raise ProtocolError("bad_request", "this server does not train: nothing to save (start it with "
                                "`moerun serve --train`)", request_id)
        if len(work.saves) >= max_waiting:
            raise ProtocolError("queue_full", "too many save ops waiting", request_id)

        def done(result: dict) -> None:
            if "error" in result:
                send(envelope, error_reply(result.get("code", "internal"), result["error"], request_id))
            else:
                reply = {"op": "saved", **result}
                if request_id is not None:
                    reply["id"] = request_id
                send(envelope, reply)

        work.request_save(done)
