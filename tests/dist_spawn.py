"""Spawn-based multi-process harness for gloo tests on CPU.

`run_spawn(fn, world_size, *args)` starts `world_size` processes with torch.multiprocessing (spawn),
each joined to one gloo process group through a TCPStore that the parent binds on port 0 (never a
fixed port). Each child calls `fn(rank, world_size, *args)`. A child that raises sends its traceback to
the parent, which stops the other ranks (they may be blocked in a collective) and fails the test with
that traceback. `fn` must be a module-level function so that spawn can pickle it by name.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class ChildFailed(AssertionError):
    """A spawned rank raised or exited non-zero; the message holds its traceback."""


def _child(rank: int, world_size: int, host: str, port: int, fn: Callable[..., Any], args: tuple,
           conn: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=_timedelta(60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        conn.send(("ok", rank, ""))
    except BaseException:  # noqa: B036 - report everything, including SystemExit, to the parent
        conn.send(("error", rank, traceback.format_exc()))
        conn.close()
        os._exit(1)
    conn.close()


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def run_spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; raise ChildFailed on any failure.

    The test's own `@pytest.mark.timeout` bounds the run; children are terminated on the way out.
    """
    import torch.distributed as dist

    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_timedelta(60))
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(rank, world_size, host, store.port, fn, args, child_conn),
                            daemon=True)
            p.start()
            child_conn.close()
            procs.append(p)
            conns.append(parent_conn)
        pending = dict(enumerate(conns))
        failures: list[str] = []
        deadline = None
        while pending:
            # After a first failure the others usually fail too (a peer vanished mid-collective); give
            # them a short grace period to report, so the root cause and the echoes are all shown.
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(pending.values()), timeout=timeout)
            if not ready:
                break
            for conn in ready:
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    status, _, tb = conn.recv()
                except EOFError:
                    procs[rank].join()
                    status, tb = "error", f"rank {rank} exited with code {procs[rank].exitcode} and no report"
                del pending[rank]
                if status != "ok":
                    failures.append(f"--- rank {rank} ---\n{tb}")
                    if deadline is None:
                        deadline = time.monotonic() + 10.0
        if failures:
            raise ChildFailed("spawned rank failed:\n" + "\n".join(failures))
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise ChildFailed(f"rank {procs.index(p)} exited with code {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del store


def layout_groups(rank: int, world: int, dims: tuple[str, ...], **sizes: int) -> dict:
    """{dim: (this rank's ProcessGroup, its members)} for the cluster.Layout of `sizes` (pp=, tp=, ep=, ...).
    Every rank creates every group of every dim in the same order, as torch.distributed requires."""
    import torch.distributed as dist

    from cluster.layout import Layout

    lay = Layout(world=world, **sizes)
    mine = {}
    for dim in dims:
        for members in lay.groups(dim):
            g = dist.new_group(members)
            if rank in members:
                mine[dim] = (g, members)
    return mine
