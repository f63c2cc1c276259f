"""`train` ops are idempotent by id: a retry of an op that was applied returns its first result and applies
nothing (docs/protocol.md, "Training over ZeroMQ").

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

from runtime.serve.protocol import ProtocolError, TrainRequest, encode

__all__ = ["TrainLedger", "digest"]


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
