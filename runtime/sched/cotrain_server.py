"""Serving and training through one ZeroMQ server: the `train` op, the scheduler loop, `serve --train`.

`CoServer` extends the serving helper's `runtime.serve.server.Server`: its loop asks the shared `Scheduler` for
each step instead of stepping the engine directly, it accepts `train` ops (validated here, field by
field, errors as in the protocol), and every reply carries the weight version of the tokens it returns
(`done` also lists `weight_versions`, one per generated token). Other ranks run `Scheduler.follow()`.
"""

from __future__ import annotations

import math
from typing import Any

from runtime.serve.protocol import ProtocolError, decode_frame, error_reply
from runtime.serve.server import Server

__all__ = ["TRAIN_FIELDS", "validate_train", "CoServer", "add_train_flag", "serve_with_training"]

TRAIN_FIELDS = {"op", "id", "input_ids", "loss_mask", "advantages", "old_logprobs", "loss", "optimizer_step",
                "kl_coef"}
MAX_TRAIN_ROWS = 4096
MAX_TRAIN_QUEUE = 256  # queued train ops at most (each holds its batch)


def _rows(v: Any, key: str, rid: str, shape: list[int] | None, kind: str, lo=None, hi=None) -> list[list]:
    if not isinstance(v, list) or not v:
        raise ProtocolError("bad_request", f"{key} must be a non-empty list of lists", rid)
    if len(v) > MAX_TRAIN_ROWS:
        raise ProtocolError("too_long", f"{key} has {len(v)} rows, more than {MAX_TRAIN_ROWS}", rid)
    if shape is not None and len(v) != len(shape):
        raise ProtocolError("bad_request", f"{key} has {len(v)} rows, input_ids has {len(shape)}", rid)
    for i, row in enumerate(v):
        if not isinstance(row, list):
            raise ProtocolError("bad_request", f"{key}[{i}] must be a list, got {type(row).__name__}", rid)
        if shape is not None and len(row) != shape[i]:
            raise ProtocolError("bad_request", f"{key}[{i}] has {len(row)} entries, input_ids[{i}] has "
                                f"{shape[i]}", rid)
        for j, x in enumerate(row):
            ok = (not isinstance(x, bool) and isinstance(x, int)) if kind == "int" else (
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
            if not ok:
                what = "an integer" if kind == "int" else "a finite number"
                raise ProtocolError("bad_request", f"{key}[{i}][{j}] must be {what}, got {x!r}"[:200], rid)
            if lo is not None and not lo <= x < hi:
                raise ProtocolError("bad_request", f"{key}[{i}][{j}] = {x} is outside [{lo}, {hi})", rid)
    return v


def validate_train(msg: dict, *, vocab_size: int, max_model_len: int) -> dict:
    """A `train` request -> dict(id, input_ids, loss_mask, advantages, old_logprobs, loss, optimizer_step)."""
    rid = msg.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 256:
        raise ProtocolError("bad_request", "op 'train' needs an 'id' (a string of 1..256 characters)")
    unknown = sorted(str(k)[:64] for k in msg if k not in TRAIN_FIELDS)
    if unknown:
        raise ProtocolError("bad_request", f"unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(TRAIN_FIELDS))}", rid)
    if "input_ids" not in msg:
        raise ProtocolError("bad_request", "op 'train' needs input_ids (a list of token id lists)", rid)
    ids = _rows(msg["input_ids"], "input_ids", rid, None, "int", 0, vocab_size)
    shape = [len(r) for r in ids]
    for i, n in enumerate(shape):
        if n < 2:
            raise ProtocolError("bad_request", f"input_ids[{i}] has {n} tokens; a row needs at least 2", rid)
        if n > max_model_len:
            raise ProtocolError("too_long", f"input_ids[{i}] has {n} tokens, more than serve.max_model_len "
                                f"{max_model_len}", rid)
    mask = msg.get("loss_mask")
    if mask is not None:
        mask = _rows(mask, "loss_mask", rid, shape, "int", 0, 2)
        if not any(any(row[1:]) for row in mask):
            raise ProtocolError("bad_request", "loss_mask selects no target token (entry 0 of a row is never "
                                "a target)", rid)
    loss = msg.get("loss", "ce")
    if loss not in ("ce", "grpo"):
        raise ProtocolError("bad_request", f"loss must be 'ce' or 'grpo', got {loss!r}"[:200], rid)
    adv = msg.get("advantages")
    if adv is not None:
        if loss != "grpo":
            raise ProtocolError("bad_request", "advantages apply only to loss 'grpo'", rid)
        if not isinstance(adv, list) or len(adv) != len(ids) or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in adv):
            raise ProtocolError("bad_request", f"advantages must be {len(ids)} finite numbers (one per row)", rid)
    elif loss == "grpo":
        raise ProtocolError("bad_request", "loss 'grpo' needs advantages (one per row)", rid)
    old = msg.get("old_logprobs")
    if old is not None:
        if loss != "grpo":
            raise ProtocolError("bad_request", "old_logprobs apply only to loss 'grpo'", rid)
        old = _rows(old, "old_logprobs", rid, shape, "float")
    kl = msg.get("kl_coef", 0.0)
    if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not math.isfinite(kl) or kl < 0:
        raise ProtocolError("bad_request", f"kl_coef must be a finite number >= 0, got {kl!r}"[:200], rid)
    if kl > 0 and loss != "grpo":
        raise ProtocolError("bad_request", "kl_coef applies only to loss 'grpo'", rid)
    step = msg.get("optimizer_step", True)
    if not isinstance(step, bool):
        raise ProtocolError("bad_request", f"optimizer_step must be true or false, got {type(step).__name__}", rid)
    return {"id": rid, "input_ids": ids, "loss_mask": mask, "advantages": adv, "old_logprobs": old,
            "loss": loss, "optimizer_step": step, "kl_coef": float(kl)}


class CoServer(Server):
    """`CoServer(scheduler, bind=...)`: the serving Server driven by the shared scheduler, plus `train`."""

    def __init__(self, scheduler, **kw) -> None:
        super().__init__(scheduler.engine, **kw)
        self.scheduler = scheduler
        self._versions: dict[str, list[int]] = {}
        self._done_versions: tuple[str, list[int]] | None = None

    def _busy(self) -> bool:
        work = self.scheduler.work
        return self.engine.has_work() or (work is not None and work.has_work())

    def _turn(self, busy: bool) -> None:
        if busy or self.engine.has_work():
            self._sched_step()
        else:
            self.scheduler.keepalive()

    def _close(self) -> None:
        try:
            self.scheduler.stop()
        finally:
            super()._close()

    def _sched_step(self) -> None:
        from runtime.sched.scheduler import Kind

        sched = self.scheduler
        try:
            kind, outputs = sched.step()
        except Exception as exc:  # fail what was in flight, keep serving
            msg = f"scheduler step failed: {type(exc).__name__}: {exc}"
            self._fail_in_flight(msg)
            if sched.work is not None:
                sched.work.fail_all(msg)
            if sched.group is not None:
                raise  # other ranks may be mid-step: continuing would desynchronise the broadcasts; fail the job
            return
        self.weight_version = sched.weights.version
        if kind == Kind.SERVE:
            for out in outputs:
                self._deliver(out)

    # --- train op -------------------------------------------------------------------------------------
    def _handle(self, parts: list[bytes]) -> None:
        frame = parts[-1] if len(parts) in (2, 3) else b""
        try:
            msg = decode_frame(frame, self.max_frame_bytes)
        except ProtocolError:
            msg = None
        if not (isinstance(msg, dict) and msg.get("op") == "train"):
            super()._handle(parts)
            return
        envelope = parts[:-1]
        rid = msg.get("id") if isinstance(msg.get("id"), str) else None
        try:
            self._op_train(envelope, msg)
        except ProtocolError as e:
            self.engine.metrics.inc("errors_total")
            self._send(envelope, error_reply(e.code, e.message, e.rid if e.rid is not None else rid))
        except Exception as e:
            self.engine.metrics.inc("errors_total")
            self._send(envelope, error_reply("internal", f"{type(e).__name__}: {e}", rid))

    def _op_train(self, envelope: list[bytes], msg: dict) -> None:
        from runtime.sched.rl import RLBatch

        work = self.scheduler.work
        req = validate_train(msg, vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len)
        if work is None:
            raise ProtocolError("bad_request", "this server does not train: start it with `moerun serve "
                                "--train` (or pass a TrainWork to the Scheduler)", req["id"])
        why = work.supports(req["loss"], req["kl_coef"])
        if why is not None:
            raise ProtocolError("bad_request", why, req["id"])
        if len(work.queue) >= MAX_TRAIN_QUEUE:
            raise ProtocolError("queue_full", f"{len(work.queue)} training steps are queued; retry later",
                                req["id"])
        batch = RLBatch.from_lists(req["input_ids"], req["loss_mask"], req["advantages"], req["old_logprobs"],
                                   req["loss"], req["kl_coef"])
        cid = req["id"]

        def done(result: dict) -> None:
            if "error" in result:
                self._send(envelope, error_reply("internal", result["error"], cid))
            else:
                self._send(envelope, {"op": "trained", "id": cid, **result})

        work.submit(batch, req["optimizer_step"], done)

    # --- per-token versions ---------------------------------------------------------------------------
    def _deliver(self, out) -> None:
        if out.rid in self.active and out.ids:
            self._versions.setdefault(out.rid, []).extend([self.weight_version] * len(out.ids))
        if out.finished and out.rid in self.active:
            self._done_versions = (self.active[out.rid].cid, self._versions.pop(out.rid, []))
        super()._deliver(out)
        self._done_versions = None

    def _send(self, envelope: list[bytes], msg: dict) -> None:
        dv = self._done_versions
        if dv is not None and msg.get("op") == "done" and msg.get("id") == dv[0]:
            msg["weight_versions"] = dv[1]
        super()._send(envelope, msg)


def add_train_flag(parser) -> None:
    """For `moerun serve`: `--train` serves and trains the same weights (see docs/scheduler.md)."""
    parser.add_argument("--train", action="store_true",
                        help="also train: run the [train]/[data] job and accept `train` ops, sharing the "
                             "served weights, interleaved by the [scheduler] policy")


def serve_with_training(config: dict, mesh=None, *, bind: str | None = None, tokenizer=None,
                        info: dict | None = None, max_frame_bytes: int = 1 << 20, ready=None) -> int:
    """Build trainer + engine on one copy of the weights, then serve (driver) or follow (other ranks)."""
    from runtime.sched.scheduler import Scheduler, scheduler_config
    from runtime.sched.weights import WeightVersions
    from runtime.sched.work import TrainWork
    from runtime.serve import Engine
    from runtime.train.trainer import Trainer, resume_path

    trainer = Trainer(config, mesh, resume_from=resume_path(config))  # continues a run as `moerun train` does
    sv = config["serve"]
    group = mesh.group("world") if mesh is not None and mesh.world_size > 1 else None
    rank = mesh.rank if mesh is not None else 0
    kv_tokens = _agree_kv_tokens(sv["kv_cache_tokens"], trainer, group, sv)
    engine = Engine(trainer.model, max_batch=sv["max_batch"], max_model_len=sv["max_model_len"],
                    max_prefill_tokens=sv["max_prefill_tokens"], page_size=sv["page_size"],
                    kv_cache_tokens=kv_tokens)
    work = TrainWork(trainer, job_steps=max(0, config["train"]["steps"] - trainer.step),
                     reference=bool(config["scheduler"].get("kl_reference", False)), record=True)
    if mesh is not None and mesh.size("pp") > 1:
        from runtime.serve.distributed import pipe_stage

        # Serving runs this rank's stage: the same layers its training stage holds and updates (TrainWork
        # checked that the schedule has one stage per rank, split like `layer_split`).
        engine.set_pipeline(pipe_stage(mesh, len(trainer.model.model.layers)))
    weights = WeightVersions(engine, pin=bool(sv.get("pin_weights", False)))
    sched = Scheduler(engine, work, scheduler_config(config), weights, group=group, src=0, rank=rank,
                      device=trainer.device)
    if not sched.is_driver:
        while sched.follow():
            pass
        return 0
    info = dict(info or {})
    info.setdefault("model", config["model"]["path"])
    if mesh is not None:
        info.setdefault("layout", {d: mesh.size(d) for d in ("tp", "pp", "ep", "dp")} | {"world": mesh.world_size})
    server = CoServer(sched, bind=bind or sv["bind"], max_queue=sv["max_queue"], tokenizer=tokenizer,
                      info=info, max_frame_bytes=max_frame_bytes)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server._stop.set())
    print(f"moerun serve --train: listening on {server.endpoint}, policy {sched.policy.cfg.policy}, "
          f"{work.job_left} job steps", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _agree_kv_tokens(requested: int, trainer, group, sv: dict) -> int:
    """All ranks need the same page count (the driver's plans name pages): take the smallest."""
    import torch
    import torch.distributed as dist

    if requested > 0:
        return requested
    from runtime.serve.engine import _tokens_from_free_memory

    cfg = trainer.model.config
    p = trainer.model.lm_head.weight
    per_tok = len(trainer.model.model.layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * p.element_size()
    n = _tokens_from_free_memory(per_tok, p.device, sv["max_batch"] * sv["max_model_len"])
    if group is not None:
        t = torch.tensor([n], dtype=torch.int64, device=trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        n = int(t[0])
    return n
