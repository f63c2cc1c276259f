"""Point-to-point transfers in one small API, over real torch.distributed or over an emulation of NCCL's
p2p semantics on gloo, so that CPU tests fail where NCCL would hang.

    from cluster import p2p
    chan = p2p.channel(group)                        # backend from MOERUN_P2P
    works = chan.post([p2p.Op("send", t, peer, "act s0 mb1"), p2p.Op("recv", buf, peer, "grad s1 mb0")])
    works[1].wait()                                  # waits for the whole group, like NCCL

`post(ops)` posts one group (a single op is a group of one) and returns one work per op; the works of a
group are one object and complete together. Peers are global ranks; `name` identifies the message (the
same on both ends) and appears in errors.

Backends (environment variable MOERUN_P2P):
- `torch` (default): `torch.distributed.batch_isend_irecv` for every group, single ops included. On NCCL
  PyTorch runs batched p2p on the group's own communicator and single isend / irecv on a separate one per
  rank pair, and the two never match each other; posting everything batched keeps every op of the group
  on one communicator, in posting order.
- `nccl-emulated` (gloo groups; a dry run's fake group gets the torch channel): NCCL's semantics at their
  strictest, as parallel/pipeline/p2p_model.py states them. Per rank pair, posted groups run one at a time in
  posting order; a group with ops to several peers waits until it is first in line with each of them; its ops
  progress together; a send completes only after the peer's matching receive has started (a receiver announces
  a started receive with a small token; the sender moves its data only then: no eager buffering). Each pair
  has a worker thread that does this over gloo with tags of its own. A deadlock shows as `P2PTimeout` naming
  the ranks and messages after MOERUN_P2P_TIMEOUT seconds (default 300), never as a hang. The emulation also
  checks what NCCL would not: a send and the receive it meets must carry the same element count and name.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster import devicecheck

BACKENDS = ("torch", "nccl-emulated")
DEFAULT_TIMEOUT_S = 300.0
_CTRL_TAG, _DATA_TAG = 0x6E63, 0x6E64  # the emulation's own gloo tags: never match anyone's tag-0 traffic
_TOKEN_BYTES = 96  # 8 bytes element count + the receive's name (utf-8, zero padded)


class P2PError(RuntimeError):
    """A p2p group failed (emulation: mismatched send / receive, or a peer's failure)."""


class P2PTimeout(P2PError):
    """A p2p op was not matched in time: under the NCCL emulation, a deadlock NCCL would hang in."""


@dataclass
class Op:
    """One side of a message: kind "send" or "recv", the tensor, the peer's global rank, the message name."""

    kind: str
    tensor: torch.Tensor
    peer: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("send", "recv"):
            raise ValueError(f"p2p op kind must be 'send' or 'recv', got {self.kind!r}")

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind} {self.name or '(unnamed)'} {arrow} rank {self.peer}"


def backend_from_env(env=None) -> str:
    value = (env if env is not None else os.environ).get("MOERUN_P2P", "torch") or "torch"
    if value not in BACKENDS:
        raise ValueError(f"MOERUN_P2P={value!r} is not a p2p backend; valid: {', '.join(BACKENDS)}")
    return value


def timeout_from_env(env=None) -> float:
    raw = (env if env is not None else os.environ).get("MOERUN_P2P_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"MOERUN_P2P_TIMEOUT={raw!r} must be a number of seconds > 0")
    return value


def channel(group=None, backend: str | None = None, timeout_s: float | None = None):
    """The p2p channel of `group` (None: the world) for `backend` (None: MOERUN_P2P)."""
    backend = backend or backend_from_env()
    if backend not in BACKENDS:
        raise ValueError(f"unknown p2p backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"p2p channel needs a process group this rank belongs to, got {group!r}")
    if backend == "torch" or dist.get_backend(group) == "fake":
        return TorchChannel(group)  # a fake group (a dry run) moves no messages: nothing to emulate
    return EmulatedChannel.of(group, timeout_s if timeout_s is not None else timeout_from_env())


class GroupWork:
    """The work of one posted group (torch backend): wait() waits every op of the group once."""

    def __init__(self, works: list) -> None:
        self._works: list | None = works

    def wait(self) -> bool:
        if self._works is not None:
            works, self._works = self._works, None
            for w in works:
                w.wait()
        return True

    def is_completed(self) -> bool:
        return self._works is None or all(w.is_completed() for w in self._works)


class TorchChannel:
    """Real torch.distributed: every group through batch_isend_irecv (see the module docstring)."""

    def __init__(self, group=None) -> None:
        self.group = group

    def post(self, ops: Sequence[Op]) -> list[GroupWork]:
        if not ops:
            return []
        torch_ops = [dist.P2POp(dist.isend if op.kind == "send" else dist.irecv, op.tensor, op.peer, self.group)
                     for op in ops]
        work = GroupWork(list(dist.batch_isend_irecv(torch_ops)))
        return [work] * len(ops)


# ----------------------------------------------------------------------------------------- emulation

@dataclass(eq=False)
class _Item:
    """One posted group of the emulation."""

    seq: int
    ops: list[Op]
    peers: list[int]
    barrier: threading.Barrier | None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    error_type: type = P2PError
    state: str = "queued"  # queued / running / done / failed
    parts_left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        return f"#{self.seq} [{', '.join(str(o) for o in self.ops)}] ({self.state})"

    def fail(self, message: str, error_type: type = P2PError) -> None:
        with self.lock:
            if self.error is None:
                self.error, self.error_type = message, error_type
            self.state = "failed"
        if self.barrier is not None:
            self.barrier.abort()
        self.done.set()


class _EmulatedWork:
    def __init__(self, item: _Item, chan: EmulatedChannel) -> None:
        self.item, self.chan = item, chan

    def wait(self) -> bool:
        while not self.item.done.wait(1.0):
            self.chan.check_alive()
        if self.item.error is not None:
            raise self.item.error_type(self.item.error)
        return True

    def is_completed(self) -> bool:
        return self.item.done.is_set()


class EmulatedChannel:
    """NCCL's p2p semantics over a gloo group; one per group (like NCCL's communicator), made by `of`."""

    _by_group: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _world_key = object()
    _made = threading.Lock()

    @classmethod
    def of(cls, group, timeout_s: float) -> EmulatedChannel:
        """The channel of `group`, shared by every user in this process (its queues are the group's)."""
        key = group if group is not None else dist.group.WORLD
        with cls._made:
            chan = cls._by_group.get(key)
            if chan is None:
                chan = cls._by_group[key] = cls(group, timeout_s)
            chan.timeout_s = timeout_s
            return chan

    def __init__(self, group, timeout_s: float) -> None:
        backend = dist.get_backend(group)
        if backend != "gloo":
            raise ValueError(f"MOERUN_P2P=nccl-emulated runs over gloo groups only, this group is {backend}")
        self.group, self.timeout_s = group, timeout_s
        self.me = dist.get_rank()
        self.lock = threading.Lock()
        self.pairs: dict[int, _Pair] = {}
        self.seq = 0

    def post(self, ops: Sequence[Op]) -> list[_EmulatedWork]:
        if not ops:
            return []
        devicecheck.check("p2p post", [op.tensor for op in ops], self.group)
        for op in ops:
            if op.tensor.device.type != "cpu":
                raise ValueError(f"nccl-emulated p2p moves CPU tensors over gloo; {op} is on {op.tensor.device}")
            if op.peer == self.me:
                raise ValueError(f"{op}: a rank cannot send to or receive from itself")
            if not op.tensor.is_contiguous():
                raise ValueError(f"{op}: p2p tensors must be contiguous")
        peers = list(dict.fromkeys(op.peer for op in ops))
        with self.lock:
            self.seq += 1
            item = _Item(self.seq, list(ops), peers, threading.Barrier(len(peers)) if len(peers) > 1 else None,
                         parts_left=len(peers))
            for peer in peers:
                if peer not in self.pairs:
                    self.pairs[peer] = _Pair(self, peer)
                self.pairs[peer].push(item)
        work = _EmulatedWork(item, self)
        return [work] * len(ops)

    def check_alive(self) -> None:
        for pair in list(self.pairs.values()):
            if not pair.thread.is_alive():
                raise P2PError(f"rank {self.me}: the p2p worker for rank {pair.peer} stopped")

    def pending(self) -> str:
        """This rank's unfinished groups, pair by pair, for error messages."""
        with self.lock:
            parts = [f"with rank {p.peer}: " + ", ".join(i.describe() for i in p.queue)
                     for p in self.pairs.values() if p.queue]
        return "; ".join(parts) or "none"


class _Pair:
    """The queue of groups between this rank and one peer, worked off in order by one thread."""

    def __init__(self, chan: EmulatedChannel, peer: int) -> None:
        self.chan, self.peer = chan, peer
        self.queue: deque[_Item] = deque()
        self.ready = threading.Condition(chan.lock)
        self.broken: str | None = None
        self.broken_by: P2PError | None = None
        self.thread = threading.Thread(target=self._loop, name=f"p2p-emul-{chan.me}-{peer}", daemon=True)
        self.thread.start()

    def push(self, item: _Item) -> None:  # called with chan.lock held
        self.queue.append(item)
        self.ready.notify()

    def _loop(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                item = self.queue[0]
            try:
                if self.broken is not None:
                    item.fail(f"{self.broken} [rank {self.chan.me}'s group #{item.seq} was queued behind it]",
                              type(self.broken_by))
                elif item.error is None:
                    self._run(item)
            except Exception as e:  # noqa: BLE001 - every failure ends the group with a message, never a hang
                if not isinstance(e, P2PError):
                    e = P2PError(f"rank {self.chan.me}: p2p with rank {self.peer} failed: {type(e).__name__}: {e}")
                self.broken, self.broken_by = str(e), e
                item.fail(str(e), type(e))
            with self.ready:
                self.queue.popleft()
            with item.lock:
                item.parts_left -= 1
                last = item.parts_left == 0
                if last and item.error is None:
                    item.state = "done"
            if last:
                item.done.set()
            del item  # the worker keeps no tensor alive between groups

    def _deadline_wait(self, work, deadline: float, what: str, item: _Item) -> None:
        left = deadline - time.monotonic()
        try:
            work.wait(timedelta(seconds=max(left, 0.001)))
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError / DistError subclasses
            text = str(e)
            if "imed out" in text or "timeout" in text.lower():
                raise P2PTimeout(self._timeout_message(what, item)) from None
            raise P2PError(f"rank {self.chan.me}: {what}: gloo failed ({text.splitlines()[0][:200]}); the peer "
                           "probably gave up first, see its message") from None

    def _timeout_message(self, what: str, item: _Item) -> str:
        c = self.chan
        return (f"nccl-emulated p2p: rank {c.me}: {what}: not matched within {c.timeout_s:g} s "
                f"(MOERUN_P2P_TIMEOUT). Under NCCL's semantics (per rank pair, posted groups run one at a time "
                f"in posting order; a send finishes only when the peer's receive has started) this is a "
                f"deadlock: NCCL would hang here. Unfinished groups on rank {c.me}: {c.pending()}")

    def _run(self, item: _Item) -> None:
        c, peer, timeout = self.chan, self.peer, self.chan.timeout_s
        deadline = time.monotonic() + timeout
        if item.barrier is not None:  # a group with several peers starts when it is first in line with each
            try:
                item.barrier.wait(timeout)
            except threading.BrokenBarrierError:
                if item.error is not None:
                    return
                raise P2PTimeout(self._timeout_message(
                    f"group #{item.seq} did not reach the head of all its peers' queues", item)) from None
        item.state = "running"
        mine = [op for op in item.ops if op.peer == peer]
        ctrl_in, pending = [], []
        for op in mine:
            if op.kind == "send":
                token = torch.empty(_TOKEN_BYTES, dtype=torch.uint8, device="cpu")
                ctrl_in.append((op, token, dist.irecv(token, peer, group=c.group, tag=_CTRL_TAG)))
            else:  # announce the started receive, then take the data
                pending.append((dist.isend(_token(op), peer, group=c.group, tag=_CTRL_TAG),
                                f"announcing its {op}"))
                pending.append((dist.irecv(op.tensor, peer, group=c.group, tag=_DATA_TAG), f"its {op}"))
        for op, token, work in ctrl_in:
            self._deadline_wait(work, deadline, f"its {op} (rank {peer} has not started the matching receive)",
                                item)
            count, name = _read_token(token)
            if count != op.tensor.numel() or (name and op.name and name != op.name):
                raise P2PError(f"nccl-emulated p2p: rank {c.me}'s {op} ({op.tensor.numel()} elements) meets rank "
                               f"{peer}'s receive of {name or '(unnamed)'} ({count} elements): p2p matches in "
                               "posting order, so the two ranks post their messages in different orders")
            pending.append((dist.isend(op.tensor, peer, group=c.group, tag=_DATA_TAG), f"its {op}"))
        for work, what in pending:
            self._deadline_wait(work, deadline, what, item)
        if item.barrier is not None:  # the group holds every one of its queues until all its ops are done
            try:
                item.barrier.wait(max(deadline - time.monotonic(), 0.001))
            except threading.BrokenBarrierError:
                if item.error is not None:
                    return
                raise P2PTimeout(self._timeout_message(f"group #{item.seq}'s ops with its other peers", item)) \
                    from None


def _token(op: Op) -> torch.Tensor:
    raw = op.tensor.numel().to_bytes(8, "little") + op.name.encode()[:_TOKEN_BYTES - 8]
    return torch.frombuffer(bytearray(raw.ljust(_TOKEN_BYTES, b"\0")), dtype=torch.uint8).clone()


def _read_token(token: torch.Tensor) -> tuple[int, str]:
    raw = bytes(token.tolist())
    return int.from_bytes(raw[:8], "little"), raw[8:].rstrip(b"\0").decode(errors="replace")
