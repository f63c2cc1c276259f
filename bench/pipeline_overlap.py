"""How much EP all-to-all time does a pipeline schedule hide? 1F1B vs DualPipeV on 4 CPU ranks (pp=2 x ep=2).

    mpirun -np 4 --oversubscribe python bench/pipeline_overlap.py [--chunks 16] [--ratio 1.0] [--steps 5]
                                      [--mode bandwidth|latency]

A tiny MLA/MoE model (8 MoE layers: 4 per rank under both schedules) is split into pipeline stages; each
schedule's training step is timed with no link emulation (t_nolink), then with `parallel.emulate_link` set (t_link).
Steps run in pairs, a no-link step and then a link step whose bandwidth is calibrated on the no-link step
just before: the all-to-all time a rank issues per step (t_comm, the link's own count) is `--ratio` x the
busiest rank's compute (its time in compute actions, `PipelineExecutor.busy_s`): ~1:1 by default. Pairing
keeps both steps under the same machine load (this matters on a shared machine). The fraction of
all-to-all time hidden is

    hidden = 1 - (t_link - t_nolink) / t_comm

(1: all transfers ran under compute; 0: each one added its full time to the step), per pair; the median
over --steps pairs is reported. Step times are the slowest rank's. Compute runs on the ranks' CPU threads
(OMP_NUM_THREADS=1); the delay runs on the link's clock (parallel/link.py), so it does not need free cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_model(hidden: int, layers: int, seed: int = 0, moe_inter: int = 0):
    from runtime.model.builtin import init_weights
    from runtime.model.config import builtin_tiny_config
    from runtime.model.loading import build_model as build

    cfg = dataclasses.replace(builtin_tiny_config(), hidden_size=hidden, intermediate_size=2 * hidden,
                              moe_intermediate_size=moe_inter or hidden, num_hidden_layers=layers, n_routed_experts=8,
                              n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=hidden // 2,
                              first_k_dense_replace=0, kv_lora_rank=hidden // 2, num_nextn_predict_layers=0)
    model = build(cfg, mtp=False)
    init_weights(model, seed=seed, std=0.05)
    return model.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="micro-batches per step (>= 2*pp for dualpipev)")
    ap.add_argument("--ratio", type=float, default=1.0, help="target all-to-all : compute time")
    ap.add_argument("--steps", type=int, default=5, help="(no-link, link) step pairs per schedule")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=512,
                    help="expert intermediate size (default 512: the routed experts dominate a layer's compute, "
                         "as in DeepSeek-V3; 0: = hidden)")
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
    from parallel.expert import Dispatcher
    from parallel.link import EmulatedLink
    from parallel.pipeline import build
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stages import build_stages
    from runtime.model.loading import shard_model

    torch.set_num_threads(1)
    with cluster.init(pp=2, ep=2) as mesh:
        base = build_model(args.hidden, args.layers, moe_inter=args.moe_inter)
        vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(1)
        mbs = [(torch.randint(0, vocab, (args.batch, args.seq), generator=g),
                torch.randint(0, vocab, (args.batch, args.seq), generator=g)) for _ in range(args.chunks)]
        runners, dispatchers = {}, {}
        for kind in ("1f1b", "dualpipev"):
            sched = build(kind, 2, args.chunks)
            dispatchers[kind] = Dispatcher(base.config.n_routed_experts, mesh.group("ep"))
            model = shard_model(base, dispatchers[kind])
            runners[kind] = PipelineExecutor(build_stages(model, sched, mesh.coord("pp")), sched, mesh)

        def step(kind: str, link: EmulatedLink | None) -> float:
            """One step of `kind` with every all-to-all behind `link`; the slowest rank's wall time."""
            ex = runners[kind]
            dispatchers[kind].link = link
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

        # the all-to-all bytes and transfers per step of the busiest rank, from a counting link
        for kind in runners:
            step(kind, None)  # warm-up
        counter = EmulatedLink(bandwidth_gbps=1e12)
        step("dualpipev", counter)
        nbytes, transfers = reduce(counter.bytes), int(reduce(counter.transfers))

        def link_for(compute: float) -> dict:
            """The link whose all-to-all time per step is --ratio x `compute` seconds."""
            target = args.ratio * compute
            if args.mode == "latency":
                return {"bandwidth_gbps": 0.0, "latency_us": target / transfers * 1e6}
            wire = max(1e-9, target - transfers * args.latency_us * 1e-6)
            return {"bandwidth_gbps": nbytes * 8 / wire / 1e9, "latency_us": args.latency_us}

        if mesh.rank == 0:
            print(f"pp=2 x ep=2, {args.chunks} micro-batches of [{args.batch}, {args.seq}], hidden {args.hidden}, "
                  f"{args.layers} MoE layers (experts {args.moe_inter or args.hidden}), {transfers} all-to-alls and "
                  f"{int(nbytes)} bytes per step on the "
                  f"busiest rank; link mode {args.mode}, ratio {args.ratio}", flush=True)
        rows = {}
        for kind, ex in runners.items():
            pairs, waits, ratios, cfgs = [], [], [], []
            for _ in range(args.steps):
                # a no-link step, then a link step calibrated on that step's busiest compute time: each pair
                # sees the same machine load, and the ratio follows the load
                t0 = step(kind, None)
                busy = reduce(ex.busy_s)
                cfg = link_for(busy)
                link = EmulatedLink.from_config(cfg)
                t1 = step(kind, link)
                tc = reduce(link.total_s)
                pairs.append((t0, t1, tc, 1 - (t1 - t0) / tc))
                waits.append(1 - reduce(link.exposed_s / link.total_s, dist.ReduceOp.SUM) / mesh.world_size)
                ratios.append(tc / busy)
                cfgs.append(cfg["bandwidth_gbps"] if args.mode == "bandwidth" else cfg["latency_us"])
            rows[kind] = (pairs, waits, ratios, cfgs)
        if mesh.rank == 0:
            unit = "Gbit/s" if args.mode == "bandwidth" else "us latency"
            print(f"{'schedule':10} {'t_nolink s':>11} {'t_link s':>9} {'t_comm s':>9} {'comm/busy':>10} "
                  f"{'hidden':>7} {'waits hidden':>13}  (medians over {args.steps} pairs)")
            for kind, (pairs, waits, ratios, cfgs) in rows.items():
                med = statistics.median
                print(f"{kind:10} {med(p[0] for p in pairs):11.3f} {med(p[1] for p in pairs):9.3f} "
                      f"{med(p[2] for p in pairs):9.3f} {med(ratios):10.2f} {med(p[3] for p in pairs):7.1%} "
                      f"{med(waits):13.1%}   per pair: {' '.join(f'{p[3]:.0%}' for p in pairs)}; "
                      f"link {med(cfgs):.4g} {unit}")
            print("hidden = 1 - (t_link - t_nolink) / t_comm per pair; waits hidden = 1 - (emulated delay the ranks "
                  "slept in wait()) / t_comm, mean over ranks; comm/busy = t_comm / the busiest rank's compute "
                  "time in the pair's no-link step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
