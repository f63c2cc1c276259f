"""`moerun plan --calibrate`: measure this machine with R local ranks at once, and predict the step time of a
`moerun train` job on it with the planner's cost model (parallel/planner, a machine.MachineProfile in place
of the GPU table).

What is measured, by every rank at the same moment (so each rank sees the sharing a job of R ranks sees;
on a CPU the ranks share its cores), each as a median over ranks:
- GEMM throughput over a grid of (M, N, K) in the model's dtype, as training runs it: a linear layer's
  forward and backward (three GEMMs, autograd's layouts), and the experts' grouped GEMM the same way;
- causal attention (torch's scaled_dot_product_attention, v padded to the q/k head dim as ops/mla.py
  trains) forward and backward throughput at three sequence lengths;
- memory bandwidth of element-wise work (an add over 16 MB tensors);
- the cost of one framework op in a training step: builtin:tiny's forward + backward on 8 tokens (where
  arithmetic is negligible) timed, divided by the ops it dispatches;
- latency and bandwidth of all-to-all, all-reduce, all-gather (groups of 2 and of R) and point-to-point
  transfers, from two message sizes each.

The prediction: the job's layout, model and batch go to the planner (recipe "moerun"), which times GEMMs,
attention and communication from the measured rates; what the code does besides (framework overhead and
memory-bound element-wise work, unfused on a CPU) comes from a dry run of each pipeline rank
(runtime/dryrun.py): the ops it dispatches x the measured cost of one op, plus the bytes its element-wise ops
read and write / the measured memory bandwidth, per micro-batch visit (forward, backward) and per step.
Nothing is fitted to a measured step time: the bench (bench/calibration.py) compares the two.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import statistics
import time
from typing import Any, NamedTuple

GEMM_M = (64, 256, 1024)
GEMM_NK = ((128, 256), (256, 256), (256, 1024), (1024, 256), (1024, 1024))
GROUPS, GROUPED_M = 4, (32, 128, 512)  # experts and rows per expert of the grouped GEMM measurements
GROUPED_NK = ((128, 256), (256, 128), (512, 512), (1024, 256), (256, 1024))
ATTN_T = (128, 512, 1024)
ATTN_HEADS, ATTN_DIM = 4, 48
SIZES = (4 << 10, 1 << 20, 8 << 20)  # message sizes (bytes) the links are measured at


class Timing(NamedTuple):
    """How long each figure is timed: `reps` repetitions of at least `min_s` seconds (the op cost: `op_min_s`)."""

    min_s: float
    reps: int
    op_min_s: float


FULL = Timing(0.05, 5, 0.3)
QUICK = Timing(0.01, 3, 0.05)  # `--quick`: the same grid, timed about 5x shorter (noisier figures)


def _seconds(fn, timing: Timing, min_s: float | None = None) -> float:
    """Median seconds of one call of `fn` (after one warm-up) over `timing.reps` repetitions, each running it
    >= `min_s` (default `timing.min_s`)."""
    min_s, reps = min_s or timing.min_s, timing.reps
    fn()
    out = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_s:
                break
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def _gemm(dtype, timing: Timing) -> list[list[float]]:
    """A linear layer's forward and backward (the three GEMMs of training, as autograd runs them), per shape."""
    import torch
    import torch.nn.functional as F

    rows = []
    for n, k in GEMM_NK:
        w = torch.randn(n, k, dtype=dtype, requires_grad=True)
        for m in GEMM_M:
            x = torch.randn(m, k, dtype=dtype, requires_grad=True)
            g = torch.randn(m, n, dtype=dtype)

            def step(x=x, w=w, g=g):
                x.grad = w.grad = None
                F.linear(x, w).backward(g)
            rows.append([m, n, k, 6.0 * m * n * k / _seconds(step, timing) / 1e9])
    return rows


def _grouped(dtype, timing: Timing) -> list[list[float]]:
    """The experts' grouped GEMM (ops.moe.grouped_linear) forward and backward over GROUPS experts of m rows."""
    import torch

    from ops.moe import grouped_linear

    rows = []
    for n, k in GROUPED_NK:
        w = torch.randn(GROUPS, n, k, dtype=dtype, requires_grad=True)
        for m in GROUPED_M:
            x = torch.randn(GROUPS * m, k, dtype=dtype, requires_grad=True)
            g = torch.randn(GROUPS * m, n, dtype=dtype)
            counts = torch.full((GROUPS,), m)

            def step(x=x, w=w, g=g, counts=counts):
                x.grad = w.grad = None
                grouped_linear(x, w, counts).backward(g)
            rows.append([m, n, k, 6.0 * GROUPS * m * n * k / _seconds(step, timing) / 1e9])
    return rows


def _attention(dtype, timing: Timing) -> dict[str, list[list[float]]]:
    import torch
    import torch.nn.functional as F

    out: dict[str, list[list[float]]] = {"fwd": [], "bwd": []}
    for t in ATTN_T:
        q, k, v = (torch.randn(1, ATTN_HEADS, t, ATTN_DIM, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = 2.0 * t * (t + 1) / 2 * ATTN_HEADS * 2 * ATTN_DIM  # the planner's count (q/k and padded v)

        def fwd(q=q, k=k, v=v):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        tf, tb = _seconds(fwd, timing), _seconds(both, timing)
        out["fwd"].append([t, flops / tf / 1e9])
        out["bwd"].append([t, 2.5 * flops / max(tb - tf, 1e-9) / 1e9])
    return out


def _memory(timing: Timing) -> float:
    import torch

    x, y, z = (torch.ones(4 << 20) for _ in range(3))
    return 3 * x.numel() * 4 / _seconds(lambda: torch.add(x, y, out=z), timing) / 1e9


def _op_cost(timing: Timing) -> tuple[float, int]:
    """Seconds per dispatched op of a training forward + backward where arithmetic is negligible."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from runtime.model.loading import load_model

    model = load_model("builtin:tiny", mtp=False).train()
    ids = torch.randint(0, 250, (1, 8))

    def step():
        model(ids, ids)[0].backward()

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return _seconds(step, timing, timing.op_min_s) / Count.ops, Count.ops


def _seconds_together(fn, timing: Timing) -> float:
    """`_seconds` for a collective: every rank runs the same number of calls (agreed from the slowest
    rank's first call), or the ranks would wait on each other's missing calls forever."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    fn()
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    n = int(min(200, max(1, timing.min_s / max(float(first), 1e-6))))
    out = []
    for _ in range(timing.reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def _link(make, sizes: tuple[int, ...], counted, timing: Timing) -> dict[str, float]:
    """latency + bytes / bandwidth, least squares over the message sizes (`counted(size)`: the bytes the cost
    model charges for a call of that size); bandwidth and latency kept positive."""
    xs = [float(counted(n)) for n in sizes]
    ts = [_seconds_together(make(n), timing) for n in sizes]
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-13)  # at most 10 TB/s: a flat line is noise, not an infinitely fast link
    return {"latency_s": max(0.0, mt - slope * mx), "gbps": 1.0 / slope / 1e9}


def _links(rank: int, world: int, timing: Timing) -> dict[str, dict[str, dict[str, float]]]:
    import torch
    import torch.distributed as dist

    out: dict[str, dict[str, dict[str, float]]] = {"all_to_all": {}, "all_reduce": {}, "all_gather": {}}
    sizes = sorted({2, world}) if world > 1 else []
    for g in sizes:
        groups = [dist.new_group(list(range(s, s + g))) for s in range(0, world - world % g, g)]
        group = groups[rank // g] if rank // g < len(groups) else None
        if group is None:  # a rank left over (world not a multiple of g): keep time with the others
            continue

        def a2a(per_peer, group=group, g=g):
            x = torch.empty(per_peer // 4 * g)
            y = torch.empty_like(x)
            return lambda: dist.all_to_all_single(y, x, group=group)

        def reduce(nbytes, group=group):
            x = torch.empty(nbytes // 4)
            return lambda: dist.all_reduce(x, group=group)

        def gather(nbytes, group=group, g=g):
            x = torch.empty(nbytes // 4 // g)
            parts = [torch.empty_like(x) for _ in range(g)]
            return lambda: dist.all_gather(parts, x, group=group)

        dist.barrier()
        out["all_to_all"][str(g)] = _link(a2a, SIZES, lambda n, g=g: n * (g - 1), timing)  # bytes leaving the rank
        out["all_reduce"][str(g)] = _link(reduce, SIZES, lambda n: n, timing)
        out["all_gather"][str(g)] = _link(gather, SIZES, lambda n: n, timing)  # the gathered bytes
    if world > 1:
        peer = rank ^ 1 if (rank ^ 1) < world else rank

        def p2p(nbytes):
            x, y = torch.empty(nbytes // 4), torch.empty(nbytes // 4)

            def go():
                if peer == rank:
                    return
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]):
                    w.wait()
            return go

        dist.barrier()
        out["p2p"] = {"2": _link(p2p, SIZES, lambda n: n, timing)}
    return out


def measure_rank(rank: int, world: int, dtypes: tuple[str, ...], log=None, timing: Timing = FULL) -> dict[str, Any]:
    """Everything one rank measures (collectives with the others; the caller set up the process group)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    log = log or (lambda msg: None)
    sync = dist.barrier if world > 1 else (lambda: None)
    res: dict[str, Any] = {"gemm": {}, "attention": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        sync()
        log(f"linear layers and grouped experts, forward + backward ({name}): "
            f"{len(GEMM_M) * len(GEMM_NK) + len(GROUPED_M) * len(GROUPED_NK)} shapes")
        res["gemm"][name] = _gemm(dtype, timing)
        res["gemm"][name + "/grouped"] = _grouped(dtype, timing)
        sync()
        log(f"causal attention ({name}) at {', '.join(map(str, ATTN_T))} tokens")
        res["attention"][name] = _attention(dtype, timing)
    sync()
    log("memory bandwidth, cost of one op")
    res["mem_gbps"] = _memory(timing)
    sync()
    res["op_s"], res["ops_counted"] = _op_cost(timing)
    log("all-to-all, all-reduce, all-gather, p2p")
    res["links"] = _links(rank, world, timing)
    return res


def _child(rank: int, world: int, port: int, dtypes: tuple[str, ...], conn, timing: Timing) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        log = (lambda msg: conn.send(("log", msg))) if rank == 0 else None
        conn.send(("ok", measure_rank(rank, world, dtypes, log, timing)))
        dist.destroy_process_group()
    except BaseException:  # noqa: B036 - the parent reports it
        import traceback

        conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _median_of(results: list[Any]) -> Any:
    first = results[0]
    if isinstance(first, dict):
        return {k: _median_of([r[k] for r in results]) for k in first}
    if isinstance(first, list):
        return [_median_of([r[i] for r in results]) for i in range(len(first))]
    return statistics.median(results)


def measure(ranks: int = 4, dtypes: tuple[str, ...] = ("float32",), timeout: float = 900.0, log=None,
            quick: bool = False):
    """A MachineProfile measured by `ranks` local processes at once (gloo over loopback); `quick`: each
    figure timed about 5x shorter (the same grid, noisier figures)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from parallel.planner.machine import MachineProfile

    log = log or (lambda msg: None)
    if ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {ranks}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    t0 = time.perf_counter()
    log(f"measuring with {ranks} ranks at once: matmul, attention, memory, op cost, collectives, p2p")
    try:
        for r in range(ranks):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(r, ranks, store.port, dtypes, child, QUICK if quick else FULL),
                            daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < ranks:
            waiting = [c for r, c in enumerate(conns) if r not in results]
            ready = multiprocessing.connection.wait(waiting + [p.sentinel for p in procs],
                                                    timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"calibration did not finish within {timeout:.0f} s")
            for c in waiting:
                if c not in ready:
                    continue
                r = conns.index(c)
                try:
                    status, payload = c.recv()
                except EOFError:
                    raise RuntimeError(f"calibration rank {r} exited without a result") from None
                if status == "log":
                    log(f"  {payload}")
                elif status == "ok":
                    results[r] = payload
                else:
                    raise RuntimeError(f"calibration failed on {payload}")
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
            if dead and not any(conns[r].poll() for r in dead):
                raise RuntimeError(f"calibration rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
        results = [results[r] for r in range(ranks)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    med = _median_of(results)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    notes = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1),
             "load_average": [round(x, 2) for x in load], "cpus": os.cpu_count(), "threads_per_rank": 1, "quick": quick,
             "ops_counted": med.pop("ops_counted")}
    return MachineProfile.from_dict({"name": f"this machine ({ranks} ranks)", "ranks": ranks, **med,
                                     "notes": notes})


def predict_step(config: dict, profile, world: int, ranks_per_node: int | None = None, log=None) -> dict[str, Any]:
    """The step time of `moerun train` with `config` on `world` ranks of the measured machine: the planner's
    evaluation of the job's layout (recipe "moerun"), with the framework overhead of each pipeline rank's
    op count (a dry run of one rank per pipeline stage) at the measured cost per op."""
    from cluster.layout import Layout
    from parallel.planner.costmodel import Setup
    from parallel.planner.models import from_hf_config, with_overrides
    from parallel.planner.search import Candidate, Planner
    from runtime.dryrun import dry_run
    from runtime.model.builtin import builtin_config
    from runtime.model.config import ModelConfig

    log = log or (lambda msg: None)
    par, tr, data, path = config["parallel"], config["train"], config["data"], config["model"]["path"]
    cfg = builtin_config(path) if path.startswith("builtin:") else ModelConfig.from_file(path)
    spec = from_hf_config(cfg.to_hf_dict(), name=path)
    if tr["mtp_loss_coef"] <= 0:
        spec = with_overrides(spec, mtp_layers=0)
    rpn = ranks_per_node or world
    lay = Layout(world, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"], ranks_per_node=rpn)
    dp, pp = lay.size("dp"), lay.size("pp")
    per_dp = tr["global_batch"] // dp
    chunks = par["microbatches"] if pp > 1 else max(m for m in range(1, min(par["microbatches"], per_dp) + 1)
                                                    if per_dp % m == 0)
    visits = chunks * (2 if par["schedule"] == "dualpipev" and pp > 1 else 1)  # stage visits per rank
    over_f = over_b = over_step = 0.0
    ops = []
    for stage in range(pp):  # one rank per pipeline rank: ranks of one stage dispatch the same ops
        rank = stage * lay.stage_size
        log(f"counting the ops of rank {rank} (pipeline rank {stage}) with a dry run")
        r = dry_run(config, world, rank, rpn)
        ops.append({k: r[k] for k in ("ops", "ops_forward", "ops_backward", "elementwise_bytes")})
        moved = {k: v / (profile.mem_gbps * 1e9) for k, v in r["elementwise_bytes"].items()}
        over_f = max(over_f, (r["ops_forward"] * profile.op_s + moved["forward"]) / visits)
        over_b = max(over_b, (r["ops_backward"] * profile.op_s + moved["backward"]) / visits)
        over_step = max(over_step, (r["ops"] - r["ops_forward"] - r["ops_backward"]) * profile.op_s + moved["rest"])
    setup = Setup(seq_len=data["seq_len"], global_batch=tr["global_batch"], recipe="moerun",
                  dtype_bytes=4 if config["model"]["dtype"] == "float32" else 2, precision="bf16",
                  reserve_gb=0.0, overhead_f_s=over_f, overhead_b_s=over_b, overhead_step_s=over_step)
    planner = Planner(spec, profile.as_gpu(), world // rpn, rpn, setup)
    kind = par["schedule"] if pp > 1 else "1f1b"
    ev = planner.evaluate(Candidate(par["tp"], pp, par["ep"], dp, kind, per_dp // chunks, "none"))
    return {"step_time_s": ev.step_time_s, "makespan_s": ev.makespan_s, "dp_sync_s": ev.dp_sync_s,
            "optimizer_s": ev.optimizer_s, "bubble_fraction": ev.bubble_fraction,
            "per_microbatch_costs_ms": {k: round(v * 1e3, 3) for k, v in ev.costs.items()},
            "overhead_ms": {"forward": over_f * 1e3, "backward": over_b * 1e3, "step": over_step * 1e3},
            "ops": ops, "microbatches": chunks}
