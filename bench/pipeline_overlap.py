"""How much EP all-to-all time does a pipeline schedule hide? 1F1B vs DualPipeV on 4 CPU ranks (pp=2 x ep=2).

    mpirun -np 4 --oversubscribe python bench/pipeline_overlap.py [--chunks 8] [--ratio 1.0] [--steps 3]

A tiny MLA/MoE model (8 MoE layers, 2 per stage for both schedules) is split into pipeline stages; each schedule's
training step is timed with no link emulation (t_nolink), then with `parallel.emulate_link` set (t_link).
The link bandwidth is calibrated once so that the all-to-all time a rank issues per step (t_comm, the link's
own count) is `--ratio` x the rank's compute (the busiest rank's time in compute actions in a no-link
DualPipeV step, `PipelineExecutor.busy_s`): ~1:1 by default. The fraction of all-to-all time hidden is

    hidden = 1 - (t_link - t_nolink) / t_comm

(1: all transfers ran under compute; 0: each one added its full time to the step). Step times are the
slowest rank's, the median of --steps runs after one warm-up. Compute runs on the ranks' CPU threads
(OMP_NUM_THREADS=1); the delay runs on the link's clock (parallel/link.py), so it does not need free cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_model(hidden: int, layers: int, seed: int = 0):
    from runtime.builtin import init_weights
    from runtime.config import builtin_tiny_config
    from runtime.loading import build_model as build

    cfg = dataclasses.replace(builtin_tiny_config(), hidden_size=hidden, intermediate_size=2 * hidden,
                              moe_intermediate_size=hidden, num_hidden_layers=layers, n_routed_experts=8,
                              n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=hidden // 2,
                              first_k_dense_replace=0, kv_lora_rank=hidden // 2, num_nextn_predict_layers=0)
    model = build(cfg, mtp=False)
    init_weights(model, seed=seed, std=0.05)
    return model.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="micro-batches per step (>= 2*pp for dualpipev)")
    ap.add_argument("--ratio", type=float, default=1.0, help="target all-to-all : compute time")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--latency-us", type=float, default=50.0, help="per transfer, with --mode bandwidth")
    ap.add_argument("--mode", choices=("bandwidth", "latency"), default="bandwidth",
                    help="calibrate the link's bandwidth (bytes occupy the link in turn) or its latency alone "
                         "(transfers overlap each other)")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    import cluster
    from parallel.link import EmulatedLink
    from parallel.pipeline import build
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stages import build_stages
    from parallel.shard import parallelize

    torch.set_num_threads(1)
    with cluster.init(pp=2, ep=2) as mesh:
        base = build_model(args.hidden, args.layers)
        vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(1)
        mbs = [(torch.randint(0, vocab, (args.batch, args.seq), generator=g),
                torch.randint(0, vocab, (args.batch, args.seq), generator=g)) for _ in range(args.chunks)]
        runners = {}
        for kind in ("1f1b", "dualpipev"):
            sched = build(kind, 2, args.chunks)
            model = parallelize(copy.deepcopy(base), None, mesh.group("ep"))
            runners[kind] = PipelineExecutor(build_stages(model, sched, mesh.coord("pp")), sched, mesh)

        def step(ex: PipelineExecutor, link: EmulatedLink | None) -> float:
            """One step; the slowest rank's wall time."""
            ex.link = link
            for s in ex.stages.values():
                s.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            ex.run_step(mbs)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            return float(dt)

        def reduce(x: float, op=dist.ReduceOp.MAX) -> float:
            t = torch.tensor([x], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            return float(t)

        # calibrate on DualPipeV without a link: the busiest rank's compute time per step (its F/B/I/W/FB
        # actions), and from a counting link the all-to-all bytes and transfers per step of the busiest rank
        for ex in runners.values():
            step(ex, None)  # warm-up
        busy = []
        for _ in range(2):
            step(runners["dualpipev"], None)
            busy.append(reduce(runners["dualpipev"].busy_s))
        compute = statistics.median(busy)
        counter = EmulatedLink(bandwidth_gbps=1e12)
        step(runners["dualpipev"], counter)
        nbytes, transfers = reduce(counter.bytes), int(reduce(counter.transfers))
        target = args.ratio * compute
        if args.mode == "latency":
            cfg = {"bandwidth_gbps": 0.0, "latency_us": target / transfers * 1e6}
        else:
            wire = max(1e-9, target - transfers * args.latency_us * 1e-6)
            cfg = {"bandwidth_gbps": nbytes * 8 / wire / 1e9, "latency_us": args.latency_us}
        if mesh.rank == 0:
            print(f"pp=2 x ep=2, {args.chunks} micro-batches of [{args.batch}, {args.seq}], hidden {args.hidden}, "
                  f"{args.layers} MoE layers; emulate_link = {{bandwidth_gbps = {cfg['bandwidth_gbps']:.4g}, "
                  f"latency_us = {cfg['latency_us']:.4g}}} ({transfers} all-to-alls, {int(nbytes)} bytes per "
                  f"step on the busiest rank)", flush=True)
        rows = {}
        for kind, ex in runners.items():
            nolink, withlink, comm, exposed, busy = [], [], [], [], []
            for _ in range(args.steps):  # alternate, so both see the same machine load
                nolink.append(step(ex, None))
                busy.append(reduce(ex.busy_s))
                link = EmulatedLink.from_config(cfg)
                withlink.append(step(ex, link))
                comm.append(reduce(link.total_s))
                exposed.append(reduce(link.exposed_s / link.total_s, dist.ReduceOp.SUM) / mesh.world_size)
            t0, t1, tc = statistics.median(nolink), statistics.median(withlink), statistics.median(comm)
            rows[kind] = (t0, t1, tc, 1 - (t1 - t0) / tc, 1 - statistics.median(exposed),
                          tc / statistics.median(busy),
                          sorted(1 - (b - a) / c for a, b, c in zip(nolink, withlink, comm, strict=True)))
        if mesh.rank == 0:
            print(f"compute (busiest rank, no link) {compute:.3f} s per step", flush=True)
            print(f"{'schedule':10} {'t_nolink s':>11} {'t_link s':>9} {'t_comm s':>9} {'comm/busy':>10} "
                  f"{'hidden':>7} {'waits hidden':>13}")
            for kind, (t0, t1, tc, hid, local, ratio, pairs) in rows.items():
                print(f"{kind:10} {t0:11.3f} {t1:9.3f} {tc:9.3f} {ratio:10.2f} {hid:7.1%} {local:13.1%}   "
                      f"per pair: {' '.join(f'{p:.0%}' for p in pairs)}")
            print("hidden = 1 - (t_link - t_nolink) / t_comm; waits hidden = 1 - (emulated delay the ranks slept "
                  "in wait()) / t_comm, mean over ranks; comm/busy = t_comm / the busiest rank's compute time in "
                  "the no-link steps of that schedule (machine load moves it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
