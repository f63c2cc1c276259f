"""The ZeroMQ wire protocol: msgpack maps, validated field by field before anything reaches the engine.

Every frame is decoded with msgpack only (never pickle) and checked for size, type, range and length;
anything wrong raises `ProtocolError(code, message, request_id)`, which the server turns into an `error`
reply. The contract (fields, defaults, codes) is documented in docs/protocol.md.

Names: a request's wire field `id` is the client's `request_id` (unique per connection); the server keys
the engine with a connection-qualified `key` (see runtime/serve/server.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "ERROR_CODES", "OPS", "MAX_FRAME_BYTES", "MAX_TRAIN_ROWS", "ProtocolError", "AbortRequest", "GenerateRequest",
    "TrainLimits", "TrainRequest", "decode_frame", "encode", "error_reply", "validate_request",
]

ERROR_CODES = ("bad_request", "too_long", "queue_full", "unknown_op", "internal", "unavailable")
OPS = ("generate", "abort", "health", "info", "metrics", "train", "save")
MAX_FRAME_BYTES = 1 << 20  # default bound on one request frame
MAX_ID_CHARS = 256
MAX_STOP_IDS = 64
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
INT32 = 2**31
SEED_MAX = 2**63 - 1

MAX_TRAIN_ROWS = 4096
TRAIN_FIELDS = {"op", "id", "input_ids", "loss_mask", "advantages", "old_logprobs", "loss", "optimizer_step",
                "kl_coef"}
GENERATE_FIELDS = {
    "op", "id", "prompt", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_ids",
    "stream", "logprobs", "priority", "ignore_eos", "abort_key",
}
ABORT_FIELDS = {"op", "id", "abort_key"}


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class GenerateRequest:
    id: str
    prompt: str | None
    prompt_ids: list[int] | None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stream: bool = False
    logprobs: int = 0
    priority: int = 0
    ignore_eos: bool = False
    abort_key: str | None = None  # lets another connection abort this request (with the same key)


@dataclass
class AbortRequest:
    id: str
    abort_key: str | None = None


def encode(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def error_reply(code: str, message: str, request_id: str | None = None) -> dict:
    reply: dict[str, Any] = {"op": "error", "code": code, "message": message[:1000]}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def decode_frame(frame: bytes, max_bytes: int = MAX_FRAME_BYTES, what: str = "request") -> dict:
    """bytes -> a msgpack map with string keys, or ProtocolError("bad_request"); `what` names the frame
    in the message (the client decodes its replies here too)."""
    if len(frame) > max_bytes:
        raise ProtocolError("bad_request", f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several types (ExtraData, ValueError, FormatError, ...)
        raise ProtocolError("bad_request", f"frame is not one valid msgpack object: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_request", f"a {what} must be a msgpack map, got {type(msg).__name__}")
    return msg


def request_id_of(msg: dict) -> str | None:
    """The message's `id` when it is a valid request id (a non-empty string of bounded length), else None."""
    req_id = msg.get("id")
    return req_id if isinstance(req_id, str) and 0 < len(req_id) <= MAX_ID_CHARS else None


def _int(msg: dict, key: str, default: int | None, lo: int, hi: int, req_id: str | None) -> int | None:
    v = msg.get(key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError("bad_request", f"{key} must be an integer, got {type(v).__name__}", req_id)
    if not lo <= v <= hi:
        raise ProtocolError("bad_request", f"{key} must be in [{lo}, {hi}], got {v}", req_id)
    return v


def _float(msg: dict, key: str, default: float, lo: float, hi: float, req_id: str | None, lo_open: bool = False
           ) -> float:
    v = msg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError("bad_request", f"{key} must be a number, got {type(v).__name__}", req_id)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise ProtocolError("bad_request", f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", req_id)
    return v


def _key(msg: dict, req_id: str | None) -> str | None:
    """The optional `abort_key`: a non-empty string of bounded length."""
    v = msg.get("abort_key")
    if v is not None and not (isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS):
        raise ProtocolError("bad_request", f"abort_key must be a non-empty string of at most {MAX_ID_CHARS} "
                            "characters", req_id)
    return v


def _bool(msg: dict, key: str, req_id: str | None) -> bool:
    v = msg.get(key, False)
    if not isinstance(v, bool):
        raise ProtocolError("bad_request", f"{key} must be true or false, got {type(v).__name__}", req_id)
    return v


def _ids(v: Any, key: str, vocab: int, max_len: int, req_id: str | None, code_long: str = "bad_request"
         ) -> list[int]:
    if not isinstance(v, list):
        raise ProtocolError("bad_request", f"{key} must be a list of integers, got {type(v).__name__}", req_id)
    if len(v) > max_len:
        raise ProtocolError(code_long, f"{key} has {len(v)} entries, more than the limit of {max_len}", req_id)
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ProtocolError("bad_request", f"{key}[{i}] must be an integer, got {type(t).__name__}", req_id)
        if not 0 <= t < vocab:
            raise ProtocolError("bad_request", f"{key}[{i}] = {t} is outside the vocabulary [0, {vocab})", req_id)
    return v


def validate_request(msg: dict, *, vocab_size: int, max_model_len: int) -> tuple[str, Any]:
    """(op, payload): a GenerateRequest for generate, an AbortRequest for abort, a TrainRequest for train, the
    id (or None) otherwise."""
    req_id = request_id_of(msg)
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing or non-string field 'op'", req_id)
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op[:64]!r}; valid ops: {', '.join(OPS)}", req_id)
    raw_id = msg.get("id")
    if raw_id is not None and req_id is None:
        raise ProtocolError("bad_request", f"id must be a non-empty string of at most {MAX_ID_CHARS} characters")
    if op in ("health", "info", "metrics", "save"):
        return op, req_id
    if req_id is None:
        raise ProtocolError("bad_request", f"op {op!r} needs an 'id' (a string, unique per connection)")
    if op == "abort":
        unknown = sorted(str(k)[:64] for k in msg if k not in ABORT_FIELDS)
        if unknown:
            raise ProtocolError("bad_request", f"unknown field(s) {', '.join(unknown)}; valid: "
                                f"{', '.join(sorted(ABORT_FIELDS))}", req_id)
        return op, AbortRequest(req_id, _key(msg, req_id))
    if op == "train":
        return op, _validate_train(msg, req_id, vocab_size, max_model_len)
    unknown = sorted(str(k)[:64] for k in msg if k not in GENERATE_FIELDS)
    if unknown:
        raise ProtocolError("bad_request", f"unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(GENERATE_FIELDS))}", req_id)
    has_text, has_ids = msg.get("prompt") is not None, msg.get("prompt_ids") is not None
    if has_text == has_ids:
        raise ProtocolError("bad_request", "give exactly one of 'prompt' (string) or 'prompt_ids' (list)", req_id)
    prompt, prompt_ids = None, None
    if has_text:
        prompt = msg["prompt"]
        if not isinstance(prompt, str):
            raise ProtocolError("bad_request", f"prompt must be a string, got {type(prompt).__name__}", req_id)
        if not prompt:
            raise ProtocolError("bad_request", "prompt is empty", req_id)
        if len(prompt) > 32 * max_model_len:
            raise ProtocolError("too_long", f"prompt of {len(prompt)} characters is too long", req_id)
    else:
        prompt_ids = _ids(msg["prompt_ids"], "prompt_ids", vocab_size, max_model_len, req_id, "too_long")
        if not prompt_ids:
            raise ProtocolError("bad_request", "prompt_ids is empty", req_id)
    req = GenerateRequest(
        id=req_id,
        prompt=prompt,
        prompt_ids=prompt_ids,
        max_tokens=_int(msg, "max_tokens", 16, 1, INT32 - 1, req_id),
        temperature=_float(msg, "temperature", 0.0, 0.0, MAX_TEMPERATURE, req_id),
        top_p=_float(msg, "top_p", 1.0, 0.0, 1.0, req_id, lo_open=True),
        top_k=_int(msg, "top_k", 0, 0, INT32 - 1, req_id),
        seed=_int(msg, "seed", None, 0, SEED_MAX, req_id),
        stop_ids=tuple(_ids(msg.get("stop_ids", []), "stop_ids", vocab_size, MAX_STOP_IDS, req_id)),
        stream=_bool(msg, "stream", req_id),
        logprobs=_int(msg, "logprobs", 0, 0, MAX_LOGPROBS, req_id),
        priority=_int(msg, "priority", 0, -INT32, INT32 - 1, req_id),
        ignore_eos=_bool(msg, "ignore_eos", req_id),
        abort_key=_key(msg, req_id),
    )
    if req.max_tokens > max_model_len:
        raise ProtocolError("too_long", f"max_tokens {req.max_tokens} exceeds serve.max_model_len {max_model_len}",
                            req_id)
    if prompt_ids is not None and len(prompt_ids) + req.max_tokens > max_model_len:
        raise ProtocolError("too_long", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) "
                            f"exceeds serve.max_model_len {max_model_len}", req_id)
    return op, req


@dataclass
class TrainRequest:
    """A validated `train` op: ragged rows of token ids and what the chosen loss needs (see docs/protocol.md)."""

    id: str
    input_ids: list[list[int]]
    loss_mask: list[list[int]] | None
    advantages: list[float] | None
    old_logprobs: list[list[float]] | None
    loss: str = "ce"
    optimizer_step: bool = True
    kl_coef: float = 0.0


@dataclass
class TrainLimits:
    """What one `train` op may become (`serve.max_train_*`): rows, tokens (the sum of row lengths) and the
    bytes of its padded batch (every row padded to the longest: int64 ids, fp32 mask, fp32 old_logprobs
    when given), so a small frame cannot turn into a huge batch."""

    max_rows: int = 1024
    max_tokens: int = 65536
    max_batch_bytes: int = 32 << 20

    @staticmethod
    def batch_bytes(rows: int, cols: int, old_logprobs: bool) -> int:
        return rows * cols * (8 + 4 + (4 if old_logprobs else 0)) + rows * 4

    def check(self, req: TrainRequest) -> int:
        """The padded batch's bytes, or ProtocolError("too_long") naming the bound it exceeds."""
        rows = len(req.input_ids)
        if rows > self.max_rows:
            raise ProtocolError("too_long", f"{rows} rows exceed serve.max_train_rows = {self.max_rows}", req.id)
        tokens = sum(len(r) for r in req.input_ids)
        if tokens > self.max_tokens:
            raise ProtocolError("too_long", f"{tokens} tokens exceed serve.max_train_tokens = {self.max_tokens}",
                                req.id)
        cols = max(len(r) for r in req.input_ids)
        size = self.batch_bytes(rows, cols, req.old_logprobs is not None)
        if size > self.max_batch_bytes:
            raise ProtocolError("too_long", f"{rows} rows padded to the longest ({cols} tokens) make a batch of "
                                f"{size} bytes, more than serve.max_train_batch_bytes = {self.max_batch_bytes}; "
                                "send rows of similar length together", req.id)
        return size


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rows(v: Any, key: str, req_id: str, shape: list[int] | None, kind: str, lo=None, hi=None) -> list[list]:
    """A non-empty list of rows (of ints or finite numbers), shaped like `shape` when given."""
    if not isinstance(v, list) or not v:
        raise ProtocolError("bad_request", f"{key} must be a non-empty list of lists", req_id)
    if len(v) > MAX_TRAIN_ROWS:
        raise ProtocolError("too_long", f"{key} has {len(v)} rows, more than {MAX_TRAIN_ROWS}", req_id)
    if shape is not None and len(v) != len(shape):
        raise ProtocolError("bad_request", f"{key} has {len(v)} rows, input_ids has {len(shape)}", req_id)
    for i, row in enumerate(v):
        if not isinstance(row, list):
            raise ProtocolError("bad_request", f"{key}[{i}] must be a list, got {type(row).__name__}", req_id)
        if shape is not None and len(row) != shape[i]:
            raise ProtocolError("bad_request", f"{key}[{i}] has {len(row)} entries, input_ids[{i}] has "
                                f"{shape[i]}", req_id)
        for j, x in enumerate(row):
            ok = (not isinstance(x, bool) and isinstance(x, int)) if kind == "int" else _number(x)
            if not ok:
                what = "an integer" if kind == "int" else "a finite number"
                raise ProtocolError("bad_request", f"{key}[{i}][{j}] must be {what}, got {x!r}"[:200], req_id)
            if lo is not None and not lo <= x < hi:
                raise ProtocolError("bad_request", f"{key}[{i}][{j}] = {x} is outside [{lo}, {hi})", req_id)
    return v


def _validate_train(msg: dict, req_id: str, vocab_size: int, max_model_len: int) -> TrainRequest:
    unknown = sorted(str(k)[:64] for k in msg if k not in TRAIN_FIELDS)
    if unknown:
        raise ProtocolError("bad_request", f"unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(TRAIN_FIELDS))}", req_id)
    if "input_ids" not in msg:
        raise ProtocolError("bad_request", "op 'train' needs input_ids (a list of token id lists)", req_id)
    ids = _rows(msg["input_ids"], "input_ids", req_id, None, "int", 0, vocab_size)
    shape = [len(r) for r in ids]
    for i, n in enumerate(shape):
        if n < 2:
            raise ProtocolError("bad_request", f"input_ids[{i}] has {n} tokens; a row needs at least 2", req_id)
        if n > max_model_len:
            raise ProtocolError("too_long", f"input_ids[{i}] has {n} tokens, more than serve.max_model_len "
                                f"{max_model_len}", req_id)
    mask = msg.get("loss_mask")
    if mask is not None:
        mask = _rows(mask, "loss_mask", req_id, shape, "int", 0, 2)
        if not any(any(row[1:]) for row in mask):
            raise ProtocolError("bad_request", "loss_mask selects no target token (entry 0 of a row is never "
                                "a target)", req_id)
    loss = msg.get("loss", "ce")
    if loss not in ("ce", "grpo"):
        raise ProtocolError("bad_request", f"loss must be 'ce' or 'grpo', got {loss!r}"[:200], req_id)
    adv = msg.get("advantages")
    if adv is not None:
        if loss != "grpo":
            raise ProtocolError("bad_request", "advantages apply only to loss 'grpo'", req_id)
        if not isinstance(adv, list) or len(adv) != len(ids) or not all(_number(a) for a in adv):
            raise ProtocolError("bad_request", f"advantages must be {len(ids)} finite numbers (one per row)", req_id)
    elif loss == "grpo":
        raise ProtocolError("bad_request", "loss 'grpo' needs advantages (one per row)", req_id)
    old = msg.get("old_logprobs")
    if old is not None:
        if loss != "grpo":
            raise ProtocolError("bad_request", "old_logprobs apply only to loss 'grpo'", req_id)
        old = _rows(old, "old_logprobs", req_id, shape, "float")
    kl = msg.get("kl_coef", 0.0)
    if not _number(kl) or kl < 0:
        raise ProtocolError("bad_request", f"kl_coef must be a finite number >= 0, got {kl!r}"[:200], req_id)
    if kl > 0 and loss != "grpo":
        raise ProtocolError("bad_request", "kl_coef applies only to loss 'grpo'", req_id)
    step = msg.get("optimizer_step", True)
    if not isinstance(step, bool):
        raise ProtocolError("bad_request", f"optimizer_step must be true or false, got {type(step).__name__}", req_id)
    return TrainRequest(req_id, ids, mask, adv, old, loss, step, float(kl))
