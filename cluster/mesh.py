"""The Mesh: this rank's process groups for the layout `pp x dp x tp` (+ `ep`, `edp`), created once and
passed down explicitly (no module-level process-group state).

`cluster.init(...)` reads the launcher's environment, rendezvouses, initialises torch.distributed (NCCL on
CUDA with device = local rank, gloo on CPU; same code path), shares the job's secret over the control
group (it signs what the health watchdog writes to the unauthenticated store), starts the watchdog,
learns the node of every rank and builds the groups of `cluster.layout.Layout`. A step loop calls
`mesh.tick()` once per step so that a hung rank is named (cluster/health.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING

from cluster.env import RankInfo
from cluster.health import Watchdog
from cluster.layout import DIMS, Layout, LayoutError
from cluster.rendezvous import connect_store, rendezvous

if TYPE_CHECKING:
    import torch

__all__ = ["Mesh", "init"]

DEFAULT_TIMEOUT_S = 300.0


class Mesh:
    """Process groups and coordinates of this rank. Use as a context manager (or call `close()`)."""

    def __init__(self, info: RankInfo, layout: Layout, nodes: list[int], groups: dict, device,
                 backend: str, watchdog: Watchdog | None = None) -> None:
        self.info, self.layout, self.nodes = info, layout, nodes
        self.device, self.backend = device, backend
        self._groups = groups
        self._watchdog = watchdog
        self._closed = False

    # --- the Python API contract ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def group(self, dim: str):
        """The torch ProcessGroup of this rank's group along `dim` (tp, pp, dp, ep, edp, world), on the
        device backend; or "control": the whole job over gloo, for what the host reads (step plans,
        headers, counts), always with CPU tensors (the same group as "world" when the backend is gloo)."""
        if dim != "control" and dim not in DIMS:
            raise LayoutError(f"unknown mesh dimension {dim!r}; valid: {', '.join(DIMS)}, control")
        return self._groups[dim]

    def twin(self, dim: str):
        """A second communicator over the members of this rank's `dim` group, made on first use (every
        member asks, in the same order): two p2p streams over the same ranks that never share a FIFO, e.g.
        serving's pipeline beside a training step that is between its slices with receives posted."""
        key = f"{dim}:twin"
        if key not in self._groups:
            import torch.distributed as dist

            self._groups[key] = dist.new_group(self.ranks(dim), use_local_synchronization=True)
        return self._groups[key]

    def size(self, dim: str) -> int:
        return self.layout.size(dim)

    def coord(self, dim: str) -> int:
        if dim not in DIMS:
            raise LayoutError(f"unknown mesh dimension {dim!r}; valid: {', '.join(DIMS)}")
        return self.layout.coords(self.rank)[dim]

    def ranks(self, dim: str) -> list[int]:
        """Global ranks of this rank's group along `dim`, in group order."""
        return self.layout.group_of(dim, self.rank)

    def node_of(self, rank: int) -> int:
        return self.nodes[rank]

    @property
    def num_nodes(self) -> int:
        return len(set(self.nodes))

    def describe(self) -> str:
        c = self.layout.coords(self.rank)
        return ",".join(f"{d}:{c[d]}/{self.layout.size(d)}" for d in ("pp", "dp", "tp", "ep"))

    # --- lifetime ----------------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Tell every rank that this one failed (they stop within a heartbeat and print `message`)."""
        if self._watchdog is not None:
            self._watchdog.report_failure(message)

    def first_failure(self) -> str | None:
        return self._watchdog.failure() if self._watchdog is not None else None

    def tick(self) -> None:
        """One step of this rank's step loop is done (the watchdog's progress counter; cheap, no I/O)."""
        if self._watchdog is not None:
            self._watchdog.tick()

    def quiet(self, reason: str):
        """Context manager: this rank may be busy outside collectives for a while (`reason`); the watchdog does
        not take it for hung meanwhile."""
        return self._watchdog.quiet(reason) if self._watchdog is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist

        if dist.is_initialized():
            self._drain()  # under the watchdog: a peer that failed meanwhile ends this wait
        if self._watchdog is not None:
            self._watchdog.finish()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _drain(self) -> None:
        """A barrier on each of this rank's groups (creation order, each group once). gloo's barrier first waits
        for every collective issued before it, so afterwards no worker thread is still finishing one: a gloo
        thread that frees a Python-owned tensor while the interpreter exits aborts the whole process
        (exit 134 after a job that had succeeded)."""
        import torch.distributed as dist

        done: list = []
        for group in list(self._groups.values()):  # the layout's groups, the control group, twins
            if not any(group is g for g in done):
                done.append(group)
                dist.barrier(group=group)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or (isinstance(exc, SystemExit) and not exc.code):
            self.close()
            return False
        earlier = self._wait_for_root_cause(exc)
        if earlier is not None:
            # A peer failed first; our error is most likely its consequence (a broken collective).
            sys.stderr.write(f"[moerun] rank {self.rank}: stopping because {earlier}\n")
        else:
            what = f"{exc_type.__name__}: {exc}" if not isinstance(exc, SystemExit) else f"exit {exc.code}"
            self.fail(f"rank {self.rank} ({self.info.hostname}) failed: {what}")
        sys.stderr.flush()
        if self._watchdog is not None:
            self._watchdog.acknowledge_and_linger()
        if earlier is not None and _is_comm_error(exc) and not os.environ.get("MOERUN_TRACEBACK"):
            raise SystemExit(1) from None  # the echo of a peer's failure, reported above: no traceback
        return False


    def _wait_for_root_cause(self, exc: BaseException) -> str | None:
        """A failure reported by another rank, if any. A broken collective is usually the echo of a
        peer's death: then wait (up to the watchdog's dead-after time) for the report naming that peer,
        rather than blaming ourselves."""
        wait = self._watchdog.dead_after + 2.0 if self._watchdog and _is_comm_error(exc) else 0.0
        deadline = time.monotonic() + wait
        # waiting for the peers' verdict: the watchdog counts this rank as waiting (a hung peer is named)
        with self._watchdog.waiting() if self._watchdog is not None else contextlib.nullcontext():
            while True:
                try:
                    earlier = self.first_failure()
                except Exception:  # noqa: BLE001 - store gone: rank 0 died; the watchdog says so
                    earlier = None
                if earlier is not None or time.monotonic() >= deadline:
                    return earlier
                time.sleep(0.1)


_COMM_ERROR = re.compile(r"connection (closed|reset)|broken pipe|gloo|nccl|timed out|peer", re.IGNORECASE)


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    from cluster.p2p import P2PTimeout

    if isinstance(exc, P2PTimeout):
        return False  # a p2p deadlock is itself the root cause: report it at once, do not wait for a peer
    return isinstance(exc, getattr(dist, "DistError", ())) or bool(_COMM_ERROR.search(str(exc)))


def _signal_to_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def default_device() -> torch.device:
    """The device a single process (no launcher, no Mesh) computes on: CUDA device 0 when there is one."""
    return default_device_and_backend(RankInfo.from_env())[0]


def default_device_and_backend(info: RankInfo):
    import torch

    backend = os.environ.get("MOERUN_BACKEND")
    if torch.cuda.is_available() and backend in (None, "nccl"):
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return device, "nccl"
    return torch.device("cpu"), backend or "gloo"


def init(tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 0, *, timeout_s: float | None = None,
         watchdog: bool = True, handle_signals: bool = True) -> Mesh:
    """Join the job the launcher started and return this rank's Mesh (see module docstring)."""
    import torch
    import torch.distributed as dist

    info = RankInfo.from_env()
    layout = Layout(info.world_size, pp=pp, dp=dp, tp=tp, ep=ep)  # validate before any network traffic
    timeout_s = float(timeout_s or os.environ.get("MOERUN_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    device, backend = default_device_and_backend(info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _signal_to_exit)

    store, ep_info = rendezvous(info, timeout_s)
    dist.init_process_group(
        backend, store=store, rank=info.rank, world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None,
    )
    # the host's control plane: CPU tensors over gloo whatever the device backend is (its own group under the
    # device-discipline test mode, so the mode can tell control traffic from device traffic on gloo too);
    # made first: the watchdog's secret travels over it
    from cluster import devicecheck

    checking = devicecheck.enabled()
    control = dist.group.WORLD if backend == "gloo" and not checking else dist.new_group(backend="gloo")
    if checking:  # before the first control-plane call (the watchdog's secret); again for each Mesh made
        devicecheck.install(device, [control])
    dog = None
    if watchdog and info.world_size > 1:
        dead_after = float(os.environ.get("MOERUN_DEAD_AFTER_S", 10))
        dog_store = connect_store(ep_info.addr, ep_info.port, timeout_s=max(dead_after, 1.0))
        dog = Watchdog(dog_store, info.rank, info.world_size, f"{ep_info.addr}:{ep_info.port}",
                       dead_after_s=dead_after, secret=_job_secret(control, info.rank)).start()

    # Node of every rank, as the launcher / MPI split saw it.
    mine = torch.tensor([info.node_rank], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    nodes = [int(t.item()) for t in every]
    layout = Layout(info.world_size, pp=pp, dp=dp, tp=tp, ep=ep,
                    ranks_per_node=_uniform_ranks_per_node(nodes))
    if any(len({nodes[r] for r in g}) > 1 for g in layout.groups("tp")):
        warnings.warn(f"tp={tp} groups span nodes (node map {nodes}); TP traffic will cross the network",
                      stacklevel=2)

    groups: dict = {"world": dist.group.WORLD, "control": control}
    by_members: dict[tuple[int, ...], object] = {}
    for dim in ("tp", "pp", "dp", "ep", "edp"):
        members = tuple(layout.group_of(dim, info.rank))
        if members not in by_members:
            # Only members create a group (local synchronisation), so this is O(dims) per rank even at
            # thousands of ranks; every rank creates its groups in the same dim order, so none waits forever.
            by_members[members] = dist.new_group(list(members), use_local_synchronization=True)
        groups[dim] = by_members[members]
    return Mesh(info, layout, nodes, groups, device, backend, dog)


def _job_secret(control, rank: int) -> bytes:
    """32 random bytes drawn by rank 0 and broadcast over the job's own process group: the store never sees
    them, so whoever can reach the store cannot sign what the watchdog trusts."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(os.urandom(32)) if rank == 0 else [0] * 32, dtype=torch.int64)
    dist.broadcast(t, src=0, group=control)
    return bytes(t.tolist())


def _uniform_ranks_per_node(nodes: list[int]) -> int | None:
    """k when node i holds exactly ranks [i*k, (i+1)*k); otherwise None (placement is irregular)."""
    n = len(set(nodes))
    if len(nodes) % n:
        return None
    k = len(nodes) // n
    return k if all(nodes[r] == r // k for r in range(len(nodes))) else None
