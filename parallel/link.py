"""Emulated interconnect: delay every EP all-to-all by bytes / bandwidth + latency, off the compute thread.

`parallel.emulate_link = {bandwidth_gbps, latency_us}` (both 0: off) makes "how much all-to-all time does
the schedule hide" a number on any machine, however fast its real transport (gloo over loopback here).

Model: the link is one FIFO server with its own clock. A transfer of n bytes issued at time t holds the
link from start = max(t, when the previous transfer's bytes were through) for n / (bandwidth_gbps * 1e9 / 8)
seconds and arrives latency_us later (flight time does not hold the link):
    arrival = start + n / (bandwidth_gbps * 1e9 / 8) + latency_us * 1e-6
Its duration (what t_comm counts) is n / bandwidth + latency. Its work handle's `wait()` returns no earlier
than the arrival (and no earlier than the real transfer). The delay elapses while the issuing thread
computes, exactly like a transfer handled by a communication thread (no thread is needed: the link's
clock is arithmetic); only the part not yet elapsed when someone waits is exposed. That waiting is what the bench
measures. `bandwidth_gbps` is in gigabits per second (network convention: 400 Gbps InfiniBand = 50 GB/s).

n is the larger of the bytes this rank sends to and receives from *other* ranks (rows to itself never
cross a link). The small blocking count exchange at the start of a dispatch is not delayed.

It wraps work handles rather than the collective, so parallel/expert.py needs no link code of its own:
`handle.delay(link, nbytes)` for a `DispatchHandle` / `CombineHandle` (it hands the handle's pending works
to `link.wrap_works`), `link.wrap_works(works, nbytes)` for a list of (work, buffer) pairs of one's own,
`link.wrap(work, n)` for a single work.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class DelayedWork:
    """A work handle whose wait() also waits until the emulated arrival time."""

    def __init__(self, work: Any, arrival: float, link: EmulatedLink) -> None:
        self.work, self.arrival, self.link = work, arrival, link

    def wait(self, *args: Any) -> bool:
        if self.work is not None:
            self.work.wait(*args)
        now = time.perf_counter()
        if self.arrival > now:
            time.sleep(self.arrival - now)
            after = time.perf_counter()
            self.link.exposed_s += self.arrival - now
            self.link.oversleep_s += max(0.0, after - self.arrival)
        return True

    def is_completed(self) -> bool:
        return (self.work is None or self.work.is_completed()) and time.perf_counter() >= self.arrival


@dataclass
class EmulatedLink:
    """A FIFO link with `bandwidth_gbps` (gigabits/s, 0 = infinite) and `latency_us` per transfer."""

    bandwidth_gbps: float = 0.0
    latency_us: float = 0.0
    busy_until: float = 0.0
    total_s: float = field(default=0.0)     # emulated transfer time issued (the t_comm of the bench)
    exposed_s: float = field(default=0.0)   # delay not hidden by compute: what wait() had to sleep
    oversleep_s: float = field(default=0.0)  # how much later than asked the sleeps returned (OS scheduling)
    transfers: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.bandwidth_gbps < 0 or self.latency_us < 0:
            raise ValueError(f"emulate_link needs bandwidth_gbps >= 0 and latency_us >= 0, got "
                             f"{self.bandwidth_gbps}, {self.latency_us}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, float] | None) -> EmulatedLink | None:
        """The `parallel.emulate_link` table -> a link, or None when it is off (both values 0)."""
        if not cfg:
            return None
        unknown = set(cfg) - {"bandwidth_gbps", "latency_us"}
        if unknown:
            raise ValueError(f"unknown parallel.emulate_link keys {sorted(unknown)}; "
                             "valid: bandwidth_gbps, latency_us")
        link = cls(float(cfg.get("bandwidth_gbps", 0)), float(cfg.get("latency_us", 0)))
        return link if link.enabled else None

    @property
    def enabled(self) -> bool:
        return self.bandwidth_gbps > 0 or self.latency_us > 0

    def duration(self, nbytes: int) -> float:
        bw = self.bandwidth_gbps * 1e9 / 8
        return (nbytes / bw if bw > 0 else 0.0) + self.latency_us * 1e-6

    def issue(self, nbytes: int) -> float:
        """Book a transfer of `nbytes` issued now; returns its arrival time (perf_counter clock).

        The bytes occupy the link one transfer after another (bandwidth is shared); the latency is
        flight time and does not hold the link, so latency-bound transfers overlap each other."""
        bw = self.bandwidth_gbps * 1e9 / 8
        wire = nbytes / bw if bw > 0 else 0.0
        start = max(time.perf_counter(), self.busy_until)
        self.busy_until = start + wire
        self.total_s += self.duration(nbytes)
        self.transfers += 1
        self.bytes += int(nbytes)
        return self.busy_until + self.latency_us * 1e-6

    def wrap(self, work: Any, nbytes: int) -> DelayedWork:
        return DelayedWork(work, self.issue(nbytes), self)

    def wrap_works(self, works: list, nbytes: int) -> None:
        """Delay pending works (a list of (work, buffer) pairs, as parallel.expert and the phase engine keep
        them; replaced in place) as ONE transfer of `nbytes`: all of them complete at its arrival."""
        arrival = self.issue(nbytes)
        works[:] = [(DelayedWork(w, arrival, self), buf) for w, buf in works]

    def reset_counters(self) -> None:
        self.total_s = self.exposed_s = self.oversleep_s = 0.0
        self.transfers = self.bytes = 0
