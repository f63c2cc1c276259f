"""The ZeroMQ wire protocol: msgpack maps, validated field by field before anything reaches the engine.

Every frame is decoded with msgpack only (never pickle) and checked for size, type, range and length;
anything wrong raises `ProtocolError(code, message)`, which the server turns into an `error` reply. The
contract (fields, defaults, codes) is documented in docs/protocol.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "ERROR_CODES", "OPS", "MAX_FRAME_BYTES", "ProtocolError", "GenerateRequest", "decode_frame", "encode",
    "error_reply", "validate_request",
]

ERROR_CODES = ("bad_request", "too_long", "queue_full", "unknown_op", "internal")
OPS = ("generate", "abort", "health", "info", "metrics")
MAX_FRAME_BYTES = 1 << 20  # default bound on one request frame
MAX_ID_CHARS = 256
MAX_STOP_IDS = 64
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
INT32 = 2**31
SEED_MAX = 2**63 - 1

GENERATE_FIELDS = {
    "op", "id", "prompt", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_ids",
    "stream", "logprobs", "priority", "ignore_eos",
}


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        assert code in ERROR_CODES
        self.code, self.message, self.rid = code, message, rid


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


def encode(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def error_reply(code: str, message: str, rid: str | None = None) -> dict:
    reply: dict[str, Any] = {"op": "error", "code": code, "message": message[:1000]}
    if rid is not None:
        reply["id"] = rid
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


def _rid(msg: dict) -> str | None:
    rid = msg.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None


def _int(msg: dict, key: str, default: int | None, lo: int, hi: int, rid: str | None) -> int | None:
    v = msg.get(key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError("bad_request", f"{key} must be an integer, got {type(v).__name__}", rid)
    if not lo <= v <= hi:
        raise ProtocolError("bad_request", f"{key} must be in [{lo}, {hi}], got {v}", rid)
    return v


def _float(msg: dict, key: str, default: float, lo: float, hi: float, rid: str | None, lo_open: bool = False
           ) -> float:
    v = msg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError("bad_request", f"{key} must be a number, got {type(v).__name__}", rid)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise ProtocolError("bad_request", f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", rid)
    return v


def _bool(msg: dict, key: str, rid: str | None) -> bool:
    v = msg.get(key, False)
    if not isinstance(v, bool):
        raise ProtocolError("bad_request", f"{key} must be true or false, got {type(v).__name__}", rid)
    return v


def _ids(v: Any, key: str, vocab: int, max_len: int, rid: str | None, code_long: str = "bad_request"
         ) -> list[int]:
    if not isinstance(v, list):
        raise ProtocolError("bad_request", f"{key} must be a list of integers, got {type(v).__name__}", rid)
    if len(v) > max_len:
        raise ProtocolError(code_long, f"{key} has {len(v)} entries, more than the limit of {max_len}", rid)
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ProtocolError("bad_request", f"{key}[{i}] must be an integer, got {type(t).__name__}", rid)
        if not 0 <= t < vocab:
            raise ProtocolError("bad_request", f"{key}[{i}] = {t} is outside the vocabulary [0, {vocab})", rid)
    return v


def validate_request(msg: dict, *, vocab_size: int, max_model_len: int) -> tuple[str, Any]:
    """(op, payload): payload is a GenerateRequest for generate, the id (or None) for the other ops."""
    rid = _rid(msg)
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing or non-string field 'op'", rid)
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op[:64]!r}; valid ops: {', '.join(OPS)}", rid)
    raw_id = msg.get("id")
    if raw_id is not None and rid is None:
        raise ProtocolError("bad_request", f"id must be a non-empty string of at most {MAX_ID_CHARS} characters")
    if op in ("health", "info", "metrics"):
        return op, rid
    if rid is None:
        raise ProtocolError("bad_request", f"op {op!r} needs an 'id' (a string, unique per connection)")
    if op == "abort":
        return op, rid
    unknown = sorted(str(k)[:64] for k in msg if k not in GENERATE_FIELDS)
    if unknown:
        raise ProtocolError("bad_request", f"unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(GENERATE_FIELDS))}", rid)
    has_text, has_ids = msg.get("prompt") is not None, msg.get("prompt_ids") is not None
    if has_text == has_ids:
        raise ProtocolError("bad_request", "give exactly one of 'prompt' (string) or 'prompt_ids' (list)", rid)
    prompt, prompt_ids = None, None
    if has_text:
        prompt = msg["prompt"]
        if not isinstance(prompt, str):
            raise ProtocolError("bad_request", f"prompt must be a string, got {type(prompt).__name__}", rid)
        if not prompt:
            raise ProtocolError("bad_request", "prompt is empty", rid)
        if len(prompt) > 32 * max_model_len:
            raise ProtocolError("too_long", f"prompt of {len(prompt)} characters is too long", rid)
    else:
        prompt_ids = _ids(msg["prompt_ids"], "prompt_ids", vocab_size, max_model_len, rid, "too_long")
        if not prompt_ids:
            raise ProtocolError("bad_request", "prompt_ids is empty", rid)
    req = GenerateRequest(
        id=rid,
        prompt=prompt,
        prompt_ids=prompt_ids,
        max_tokens=_int(msg, "max_tokens", 16, 1, INT32 - 1, rid),
        temperature=_float(msg, "temperature", 0.0, 0.0, MAX_TEMPERATURE, rid),
        top_p=_float(msg, "top_p", 1.0, 0.0, 1.0, rid, lo_open=True),
        top_k=_int(msg, "top_k", 0, 0, INT32 - 1, rid),
        seed=_int(msg, "seed", None, 0, SEED_MAX, rid),
        stop_ids=tuple(_ids(msg.get("stop_ids", []), "stop_ids", vocab_size, MAX_STOP_IDS, rid)),
        stream=_bool(msg, "stream", rid),
        logprobs=_int(msg, "logprobs", 0, 0, MAX_LOGPROBS, rid),
        priority=_int(msg, "priority", 0, -INT32, INT32 - 1, rid),
        ignore_eos=_bool(msg, "ignore_eos", rid),
    )
    if req.max_tokens > max_model_len:
        raise ProtocolError("too_long", f"max_tokens {req.max_tokens} exceeds serve.max_model_len {max_model_len}",
                            rid)
    if prompt_ids is not None and len(prompt_ids) + req.max_tokens > max_model_len:
        raise ProtocolError("too_long", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) "
                            f"exceeds serve.max_model_len {max_model_len}", rid)
    return op, req
