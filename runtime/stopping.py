"""Graceful stop on SIGTERM / SIGINT: the first signal asks the job to stop at the next step boundary
(finish the step in flight, save what is not saved, answer what waits, exit 0); a second one exits at once.

Under a launcher the signal may reach one rank (the pid on the start-up line, which is rank 0's) or all of
them (srun / scancel); `agreed()` is collective, so every rank learns at the same step that some rank was
asked to stop, and all stop together.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["StopRequest"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """`StopRequest("moerun train").install()` in the main thread; poll `requested` (this process) or
    `agreed(group)` (collective: True on every rank once any rank was asked). `on_request` runs in the
    signal handler after the flag is set (e.g. a server's `request_stop`)."""

    def __init__(self, who: str, on_request: Callable[[str], None] | None = None) -> None:
        self.who = who
        self.on_request = on_request
        self.reason: str | None = None  # the signal's name, or what asked otherwise
        self._event = threading.Event()

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            print(f"{self.who}: {name} again: stopping now", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        print(f"{self.who}: {name}: stopping after the step in flight (send it again to stop at once)",
              file=sys.stderr, flush=True)
        self.request(name)

    def request(self, reason: str) -> None:
        """Ask to stop (what a first signal does)."""
        self.reason = self.reason or reason
        self._event.set()
        if self.on_request is not None:
            self.on_request(reason)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def agreed(self, group=None) -> bool:
        """Whether any rank of `group` (the job's CPU control group; None: this process alone) was asked to
        stop. Collective: every rank of the group calls it at the same point."""
        if group is None:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], dtype=torch.int64, device="cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and not self.requested:
            self.reason = "another rank was signalled"
            self._event.set()
        return bool(flag.item())
