"""A dead rank ends the whole job quickly and says which rank it was.

Every rank runs a small watchdog thread on its own connection to the rendezvous store:
  - it bumps its heartbeat counter every `interval_s`;
  - it watches one neighbour's heartbeat (the next live rank in a ring, so the store sees O(world)
    operations per interval, not O(world^2)); a neighbour silent for `dead_after_s` is declared dead;
  - it polls the job's failure counter; once any rank has reported a failure (an exception, a signal, a
    dead neighbour), it prints the report naming the failed rank and exits this rank with status 1.
A rank that finishes normally marks itself done, so it is not taken for dead; rank 0 hosts the store and
waits for every rank's done mark before it leaves. A lost store means rank 0 died.
Tunables: MOERUN_HEARTBEAT_S (default 0.5) and MOERUN_DEAD_AFTER_S (default 10).
"""

from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["Watchdog", "FAIL_EXIT_CODE"]

FAIL_EXIT_CODE = 1
_NFAIL, _FAILMSG, _NDONE, _NSEEN = "moerun/nfail", "moerun/failmsg", "moerun/ndone", "moerun/nseen"


def _log(msg: str) -> None:
    sys.stderr.write(f"[moerun] {msg}\n")
    sys.stderr.flush()


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, store_desc: str,
                 interval_s: float | None = None, dead_after_s: float | None = None) -> None:
        self.store, self.rank, self.world = store, rank, world_size
        self.store_desc = store_desc
        self.interval = float(interval_s or os.environ.get("MOERUN_HEARTBEAT_S", 0.5))
        self.dead_after = float(dead_after_s or os.environ.get("MOERUN_DEAD_AFTER_S", 10))
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one store connection, two threads (watchdog and reporters)
        self._thread = threading.Thread(target=self._run, name="moerun-watchdog", daemon=True)

    # --- called from the main thread ------------------------------------------------------------------
    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def report_failure(self, message: str) -> None:
        """Record this rank's failure for everyone (first report is what the others print)."""
        try:
            with self._lock:
                if self.store.add(_NFAIL, 0) == 0:
                    self.store.set(_FAILMSG, message)
                self.store.add(_NFAIL, 1)
        except Exception:  # noqa: BLE001 - store gone: the launcher will still see our exit code
            pass

    def failure(self) -> str | None:
        """The first failure reported by any rank, or None."""
        with self._lock:
            if self.store.add(_NFAIL, 0) == 0:
                return None
            return self.store.get(_FAILMSG).decode(errors="replace")

    def finish(self, timeout_s: float = 60.0) -> None:
        """Normal end: mark done; rank 0 keeps the store up until every rank has marked done."""
        try:
            with self._lock:
                self.store.add(f"moerun/done/{self.rank}", 1)
                self.store.add(_NDONE, 1)
            if self.rank == 0:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and not self._stop.is_set():
                    with self._lock:
                        if self.store.add(_NDONE, 0) >= self.world:
                            break
                    time.sleep(0.05)
        finally:
            self._stop.set()
            self._thread.join(timeout=5)

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
            with self._lock:
                self.store.add(_NSEEN, 1)
            if self.rank != 0:
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                with self._lock:
                    if self.store.add(_NSEEN, 0) >= self.world:
                        return
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - store gone: nothing left to wait for
            pass

    def _die(self, message: str) -> None:
        _log(f"rank {self.rank}: stopping because {message}")
        self.acknowledge_and_linger()
        os._exit(FAIL_EXIT_CODE)

    def _run(self) -> None:
        hb_key = f"moerun/hb/{self.rank}"
        watched, last_value, last_change = None, -1, time.monotonic()
        while not self._stop.wait(self.interval):
            reported = None
            try:
                with self._lock:
                    self.store.add(hb_key, 1)
                    if self.store.add(_NFAIL, 0) > 0:
                        reported = self.store.get(_FAILMSG).decode(errors="replace")
                    peer = self._neighbour()
                    value = self.store.add(f"moerun/hb/{peer}", 0) if peer is not None else 0
            except Exception as exc:  # noqa: BLE001
                if self._stop.is_set():
                    return
                self._die(f"the rendezvous store on rank 0 ({self.store_desc}) is gone ({exc}): "
                          f"rank 0 died or was killed")
            if self._stop.is_set():
                return
            if reported is not None:
                self._die(reported)
            now = time.monotonic()
            if peer != watched or value != last_value:
                watched, last_value, last_change = peer, value, now
            elif now - last_change > self.dead_after:
                msg = (f"rank {peer} stopped responding (no heartbeat for {now - last_change:.1f} s); "
                       f"it died, was killed, or its host is unreachable")
                self.report_failure(msg)
                self._die(msg)
