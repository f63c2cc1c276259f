"""A dead or hung rank ends the whole job quickly and says which rank it was.

Every rank runs a small watchdog thread on its own connection to the rendezvous store:
  - it publishes its heartbeat every `interval_s`, and watches one neighbour's (the next live rank in a
    ring, so the store sees O(world) operations per interval, not O(world^2)); a neighbour silent for
    `dead_after_s` is declared dead (it died, was killed or stopped, or its host is unreachable);
  - it publishes its step loop's progress: a counter the loop bumps with `tick()` (the scheduler's steps,
    the trainer's steps) plus the moves of the loop thread between samples (its Python frame and line), and
    whether that thread is waiting in a collective (inside torch.distributed, or on a line that waits for a
    collective's handle) or busy elsewhere. Rank 0 judges: when no rank has made progress for
    `dead_after_s` while some ranks wait in collectives and others are busy without moving, the busy ones
    are hung (alive, heartbeat and all, but stuck: a GPU hang, a deadlock) and are named. A rank inside
    `quiet(reason)` (a long checkpoint write) is never judged; nor is any rank before every rank's loop
    has ticked once (start-up, model loading);
  - it polls the job's failure reports; once any rank has reported a failure (an exception, a signal, a
    dead or hung rank), it prints the report naming the failed rank and exits this rank with status 1.
A rank that finishes normally marks itself done, so it is not taken for dead; rank 0 hosts the store and
waits for every rank's done mark before it leaves. A lost store means rank 0 died; a frozen one (rank 0
stopped: the TCPStore client has no timeout of its own) is caught by a second thread that ends this rank
when a store operation has not returned within `dead_after_s`.

The store (a torch TCPStore) has no authentication, so everything here that can stop the job is signed
with the job's secret (`secret`, shared over the job's own process group, never through the store):
failure reports, heartbeats and progress carry an HMAC, and a value that does not verify is ignored. An
outsider who can reach the store cannot stop the job with a message of their own.
Tunables: MOERUN_HEARTBEAT_S (default 0.5) and MOERUN_DEAD_AFTER_S (default 10).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import linecache
import os
import sys
import threading
import time

__all__ = ["Watchdog", "FAIL_EXIT_CODE", "in_collective"]

FAIL_EXIT_CODE = 1
_NFAIL, _NDONE, _NSEEN = "moerun/nfail", "moerun/ndone", "moerun/nseen"
_SCAN = 64  # failure reports read at most per poll (the newest)


def _log(msg: str) -> None:
    sys.stderr.write(f"[moerun] {msg}\n")
    sys.stderr.flush()


def in_collective(frame) -> bool:
    """Whether a thread whose innermost frame is `frame` is waiting for its peers: inside torch.distributed
    (a blocking collective), or on a line that waits for an asynchronous one (`work.wait()`)."""
    depth = 0
    while frame is not None and depth < 64:
        code = frame.f_code
        if f"torch{os.sep}distributed{os.sep}" in code.co_filename:
            return True
        if depth < 3 and ".wait(" in linecache.getline(code.co_filename, frame.f_lineno):
            return True
        frame, depth = frame.f_back, depth + 1
    return False


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, store_desc: str,
                 interval_s: float | None = None, dead_after_s: float | None = None, secret: bytes = b"") -> None:
        self.store, self.rank, self.world = store, rank, world_size
        self.store_desc = store_desc
        self.interval = float(interval_s or os.environ.get("MOERUN_HEARTBEAT_S", 0.5))
        self.dead_after = float(dead_after_s or os.environ.get("MOERUN_DEAD_AFTER_S", 10))
        self.secret = secret
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one store connection, two threads (watchdog and reporters)
        self._thread = threading.Thread(target=self._run, name="moerun-watchdog", daemon=True)
        self._sentinel = threading.Thread(target=self._watch_store, name="moerun-store-sentinel", daemon=True)
        self._op_since: float | None = None  # when the store operation in progress started
        self._beats = 0
        self._bad_reports: set[int] = set()  # failure report slots that exist but do not verify
        # the step loop's progress (written by the loop thread, read by the watchdog thread)
        self._ticks = 0
        self._loop_thread: int | None = None
        self._quiet = self._waiting = 0
        self._moves, self._where = 0, None
        # rank 0's view of every rank's progress
        self._seen: list[str] | None = None
        self._acknowledged = False
        self._stalled_since = time.monotonic()
        self._waited: set[int] = set()
        self._beats_then: list[int] = []  # every rank's heartbeat count when the stall began

    # --- signing ------------------------------------------------------------------------------------------
    def _signed(self, key: str, text: str) -> str:
        mac = hmac.new(self.secret, f"{key}\n{text}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{text}|{mac}"

    def _verified(self, key: str, raw: bytes) -> str | None:
        text, _, mac = raw.decode(errors="replace").rpartition("|")
        return text if hmac.compare_digest(self._signed(key, text), f"{text}|{mac}") else None

    def _get(self, key: str) -> str | None:
        """The verified value of `key` (None: absent or not signed with this job's secret)."""
        if not self.store.check([key]):
            return None
        return self._verified(key, self.store.get(key))

    @contextlib.contextmanager
    def _store(self):
        """Hold the store connection for a few operations (timed by the sentinel)."""
        with self._lock:
            self._op_since = time.monotonic()
            try:
                yield
            finally:
                self._op_since = None

    def _watch_store(self) -> None:
        while not self._stop.wait(self.interval):
            since = self._op_since
            if since is not None and time.monotonic() - since > self.dead_after:
                _log(f"rank {self.rank}: stopping because the rendezvous store on rank 0 ({self.store_desc}) has "
                     f"not answered for {time.monotonic() - since:.1f} s: rank 0 died, was killed or stopped")
                os._exit(FAIL_EXIT_CODE)

    # --- called from the main thread ------------------------------------------------------------------
    def start(self) -> Watchdog:
        self._thread.start()
        self._sentinel.start()
        return self

    def tick(self) -> None:
        """One more step of this rank's step loop (call it from the loop's thread)."""
        self._ticks += 1
        self._loop_thread = threading.get_ident()

    @contextlib.contextmanager
    def quiet(self, reason: str):
        """A stretch where this rank may be busy for long outside collectives (`reason`, e.g. writing a
        checkpoint): it is not judged hung meanwhile."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    @contextlib.contextmanager
    def waiting(self):
        """This rank waits for its peers outside torch.distributed (e.g. for the report of the failure that
        broke its collective): it counts as waiting, without moves."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    def report_failure(self, message: str) -> None:
        """Record this rank's failure for everyone (the first report is what the others print)."""
        try:
            with self._store():
                n = self.store.add(_NFAIL, 1)
                key = f"moerun/fail/{n}"
                self.store.set(key, self._signed(key, message))
        except Exception:  # noqa: BLE001 - store gone: the launcher will still see our exit code
            pass

    def failure(self) -> str | None:
        """The first failure reported by any rank (signed with the job's secret), or None."""
        with self._store():
            return self._failure_locked()

    def _failure_locked(self) -> str | None:
        count = self.store.add(_NFAIL, 0)
        for n in range(max(1, count - _SCAN + 1), count + 1):
            if n in self._bad_reports:
                continue
            key = f"moerun/fail/{n}"
            if not self.store.check([key]):
                continue  # counted, not written yet (or never: an outsider's count)
            message = self._verified(key, self.store.get(key))
            if message is not None:
                return message
            self._bad_reports.add(n)
        return None

    def finish(self, timeout_s: float = 60.0) -> None:
        """Normal end: mark done; rank 0 keeps the store up until every rank has marked done."""
        try:
            with self._store():
                self.store.add(f"moerun/done/{self.rank}", 1)
                self.store.add(_NDONE, 1)
            if self.rank == 0:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and not self._stop.is_set():
                    with self._store():
                        if self.store.add(_NDONE, 0) >= self.world:
                            break
                    time.sleep(0.05)
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            self._sentinel.join(timeout=5)

    # --- the thread ------------------------------------------------------------------------------------
    def _neighbour(self) -> int | None:
        for step in range(1, self.world):
            peer = (self.rank + step) % self.world
            if self.store.add(f"moerun/done/{peer}", 0) == 0:
                return peer
        return None

    def acknowledge_and_linger(self, grace_s: float = 3.0) -> None:
        """Say we have seen the failure; rank 0, which hosts the store, stays until the others have read
        the report too (or `grace_s` passed: dead ranks never acknowledge)."""
        try:
            with self._store():
                if not self._acknowledged:  # once per rank: the main thread and this thread may both get here
                    self._acknowledged = True
                    self.store.add(_NSEEN, 1)
            if self.rank != 0:
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                with self._store():
                    if self.store.add(_NSEEN, 0) >= self.world:
                        return
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - store gone: nothing left to wait for
            pass

    def _die(self, message: str) -> None:
        _log(f"rank {self.rank}: stopping because {message}")
        self.acknowledge_and_linger()
        os._exit(FAIL_EXIT_CODE)

    def _progress(self) -> str | None:
        """This rank's progress record: "beats progress state" (state w: waiting in a collective, b: busy,
        q: quiet); None before the step loop's first tick."""
        if self._loop_thread is None:
            return None
        if self._waiting:
            return f"{self._beats} {self._ticks + self._moves} {'q' if self._quiet else 'w'}"
        frame = sys._current_frames().get(self._loop_thread)
        where = (frame.f_code, frame.f_lineno) if frame is not None else None
        if where != self._where:
            self._moves, self._where = self._moves + 1, where
        state = "q" if self._quiet else ("w" if in_collective(frame) else "b")
        return f"{self._beats} {self._ticks + self._moves} {state}"

    def _judge(self, now: float) -> str | None:
        """Rank 0: the message naming the hung ranks, when the job has stalled on them (see the docstring)."""
        keys = [f"moerun/progress/{r}" for r in range(self.world)]
        if not self.store.check(keys) or self.store.add(_NDONE, 0) > 0:
            return None  # a loop has not started yet, or ranks are finishing
        records = [self._verified(k, v) for k, v in zip(keys, self.store.multi_get(keys))]
        if any(r is None for r in records):
            return None
        states = [r.split() for r in records]
        progress = [s[1] for s in states]
        if progress != self._seen:
            self._seen, self._stalled_since, self._waited = progress, now, set()
            self._beats_then = [int(s[0]) for s in states]
        self._waited |= {r for r, s in enumerate(states) if s[2] != "b"}
        waiting = [r for r, s in enumerate(states) if s[2] == "w"]
        # hung: never seen waiting since the stall began, and alive (its heartbeat went on: a rank that
        # stopped altogether is the ring watcher's, "stopped responding")
        hung = [r for r in range(self.world) if r not in self._waited and int(states[r][0]) > self._beats_then[r]]
        stalled = now - self._stalled_since
        if stalled < self.dead_after or not hung or not waiting or any(s[2] == "q" for s in states):
            return None
        who = ", ".join(map(str, hung))
        return (f"rank {who} {'is' if len(hung) == 1 else 'are'} hung: alive, but no progress for "
                f"{stalled:.1f} s outside any collective while rank {', '.join(map(str, waiting))} waited in "
                f"one (a stuck kernel, a deadlock, an endless loop?)")

    def _run(self) -> None:
        hb_key = f"moerun/hb/{self.rank}"
        watched, last_value, last_change = None, -1, time.monotonic()
        while not self._stop.wait(self.interval):
            reported = verdict = None
            try:
                with self._store():
                    self._beats += 1
                    self.store.set(hb_key, self._signed(hb_key, str(self._beats)))
                    progress = self._progress()
                    if progress is not None:
                        key = f"moerun/progress/{self.rank}"
                        self.store.set(key, self._signed(key, progress))
                    if self.store.add(_NFAIL, 0) > 0:
                        reported = self._failure_locked()
                    peer = self._neighbour()
                    beat = self._get(f"moerun/hb/{peer}") if peer is not None else None
                    if self.rank == 0 and reported is None:
                        verdict = self._judge(time.monotonic())
            except Exception as exc:  # noqa: BLE001
                if self._stop.is_set():
                    return
                self._die(f"the rendezvous store on rank 0 ({self.store_desc}) is gone or frozen ({exc}): "
                          f"rank 0 died, was killed or stopped")
            if self._stop.is_set():
                return
            if reported is not None:
                self._die(reported)
            if verdict is not None:
                self.report_failure(verdict)
                self._die(verdict)
            now = time.monotonic()
            value = int(beat) if beat is not None else last_value  # unsigned or absent: no news
            if peer != watched or value > last_value:
                watched, last_value, last_change = peer, value, now
            elif now - last_change > self.dead_after:
                msg = (f"rank {peer} stopped responding (no heartbeat for {now - last_change:.1f} s); "
                       f"it died, was killed or stopped, or its host is unreachable")
                self.report_failure(msg)
                self._die(msg)
