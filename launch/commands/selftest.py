"""`moerun selftest`: every collective the runtime uses, on every group of the mesh, checked and timed."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from launch.job import add_config_arguments, load_job_config, run_on_mesh

HELP = "check and time collectives on every group of the mesh"
DESCRIPTION = """\
Join the mesh of the configured layout (parallel.tp/pp/ep/dp) and, on every group kind (world, tp, pp,
dp, ep, edp), run all_reduce, all_gather, all_to_all_single and a p2p ring (batch_isend_irecv). Every
result is checked against the value it must have; a wrong value fails the job. Rank 0 then prints a
table of the slowest group of each kind: time per call, algorithm bandwidth (bytes / time) and bus
bandwidth (the algorithm bandwidth scaled by the collective's traffic factor, comparable to nccl-tests).

--fail-rank R is a fault drill: rank R kills itself (SIGKILL) mid-run; every other rank must stop within
seconds with a message naming rank R, and the job must exit non-zero.

examples:
  moerun launch -n 4 -- selftest --set parallel.tp=2 --set parallel.ep=2
  moerun launch -n 4 -- selftest --fail-rank 2"""

DIMS = ("world", "tp", "pp", "dp", "ep", "edp")
OPS = ("all_reduce", "all_gather", "all_to_all", "p2p_ring")


class SelftestError(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--size-mb", type=float, default=None,
                        help="message size per rank for timing (default 4 on CPU, 64 on GPU)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per op (default 5)")
    parser.add_argument("--fail-rank", type=int, default=None, metavar="R",
                        help="fault drill: rank R dies mid-run (SIGKILL)")


def _expect(cond: bool, dim: str, op: str, detail: str) -> None:
    if not cond:
        raise SelftestError(f"{op} on the {dim} group returned a wrong result: {detail}")


def check_group(mesh, dim: str) -> None:
    """Run each op once on small tensors whose correct results are known exactly."""
    import torch
    import torch.distributed as dist

    group, members, me = mesh.group(dim), mesh.ranks(dim), mesh.rank
    n, pos, dev = len(members), members.index(me), mesh.device

    x = torch.full((4,), float(me + 1), device=dev)
    dist.all_reduce(x, group=group)
    _expect(torch.all(x == float(sum(r + 1 for r in members))).item(), dim, "all_reduce", f"got {x.tolist()}")

    mine = torch.full((3,), float(me), device=dev)
    out = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(out, mine, group=group)
    got = [int(t[0].item()) for t in out]
    _expect(got == members, dim, "all_gather", f"got {got}, want {members}")

    # chunk j of rank r carries r*1000 + j, with uneven sizes (j+1 elements) to exercise split lists.
    send = torch.cat([torch.full((j + 1,), float(me * 1000 + j), device=dev) for j in range(n)])
    recv = torch.empty(n * (pos + 1), device=dev)
    dist.all_to_all_single(recv, send, output_split_sizes=[pos + 1] * n,
                           input_split_sizes=[j + 1 for j in range(n)], group=group)
    want = torch.cat([torch.full((pos + 1,), float(r * 1000 + pos), device=dev) for r in members])
    _expect(torch.equal(recv, want), dim, "all_to_all_single", f"got {recv.tolist()}")

    if n > 1:
        nxt, prv = members[(pos + 1) % n], members[(pos - 1) % n]
        out_t, in_t = torch.full((2,), float(me), device=dev), torch.empty(2, device=dev)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, out_t, nxt, group),
                                       dist.P2POp(dist.irecv, in_t, prv, group)])
        for r in reqs:
            r.wait()
        _expect(torch.all(in_t == float(prv)).item(), dim, "p2p ring", f"from {prv} got {in_t.tolist()}")


def time_group(mesh, dim: str, numel: int, iters: int) -> list[float]:
    """Seconds per call of each op on this rank's group (the caller takes the max over ranks)."""
    import torch
    import torch.distributed as dist

    group, members = mesh.group(dim), mesh.ranks(dim)
    n, pos, dev = len(members), members.index(mesh.rank), mesh.device
    n_even = numel - numel % n
    buf = torch.ones(n_even, device=dev)
    gathered = [torch.empty(n_even // n, device=dev) for _ in range(n)]
    a2a_out = torch.empty_like(buf)
    ring_in = torch.empty_like(buf)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def p2p():
        if n == 1:
            return
        reqs = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, buf, members[(pos + 1) % n], group),
            dist.P2POp(dist.irecv, ring_in, members[(pos - 1) % n], group),
        ])
        for r in reqs:
            r.wait()

    ops = {
        "all_reduce": lambda: dist.all_reduce(buf, group=group),
        "all_gather": lambda: dist.all_gather(gathered, buf[: n_even // n], group=group),
        "all_to_all": lambda: dist.all_to_all_single(a2a_out, buf, group=group),
        "p2p_ring": p2p,
    }
    times = []
    for name in OPS:
        ops[name]()  # warm-up (connection set-up, allocator)
        sync()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for _ in range(iters):
            ops[name]()
        sync()
        times.append((time.perf_counter() - t0) / iters)
    return times


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' convention: bytes each rank must move, relative to the message size."""
    if n == 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
            "all_to_all": (n - 1) / n, "p2p_ring": 1.0}[op]


def _drill(mesh, fail_rank: int) -> None:
    if mesh.rank == fail_rank:
        msg = f"rank {fail_rank} ({mesh.info.hostname}) died: --fail-rank drill (SIGKILL)"
        sys.stderr.write(f"[moerun] {msg}\n")
        sys.stderr.flush()
        mesh.fail(msg)
        os.kill(os.getpid(), signal.SIGKILL)


def selftest(mesh, size_mb: float | None, iters: int, fail_rank: int | None) -> int:
    import torch
    import torch.distributed as dist

    if fail_rank is not None and not 0 <= fail_rank < mesh.world_size:
        raise SystemExit(f"moerun selftest: --fail-rank {fail_rank} is outside world size {mesh.world_size}")
    if size_mb is None:
        size_mb = 64.0 if mesh.device.type == "cuda" else 4.0
    numel = max(1, int(size_mb * 2**20 / 4))
    start = time.perf_counter()
    times = []
    for i, dim in enumerate(DIMS):
        check_group(mesh, dim)
        if i == 1 and fail_rank is not None:
            _drill(mesh, fail_rank)
        times.append(time_group(mesh, dim, numel, iters))
    t = torch.tensor(times, dtype=torch.float64, device=mesh.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest group of each kind sets the figure
    if mesh.rank == 0:
        print(format_table(mesh, t.tolist(), numel * 4), flush=True)
        print(f"selftest passed: {len(DIMS)} group kinds x {len(OPS)} ops checked on {mesh.world_size} "
              f"ranks ({mesh.layout.describe()}, {mesh.backend}) in {time.perf_counter() - start:.1f} s",
              flush=True)
    return 0


def format_table(mesh, times: list[list[float]], nbytes: int) -> str:
    lines = [f"{'group':<6} {'size':>4} {'count':>5}  {'op':<11} {'time_ms':>9} {'algbw_GB/s':>10} "
             f"{'busbw_GB/s':>10}"]
    for dim, row in zip(DIMS, times):
        n, count = mesh.size(dim), len(mesh.layout.groups(dim))
        for op, sec in zip(OPS, row):
            if n == 1 and op == "p2p_ring":
                continue
            alg = nbytes / sec / 1e9 if sec > 0 else float("inf")
            lines.append(f"{dim:<6} {n:>4} {count:>5}  {op:<11} {sec * 1e3:>9.3f} {alg:>10.3f} "
                         f"{alg * bus_factor(op, n):>10.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_job_config(args)
    if args.iters < 1:
        raise SystemExit("moerun selftest: --iters must be >= 1")
    return run_on_mesh(config, lambda mesh: selftest(mesh, args.size_mb, args.iters, args.fail_rank))
