"""`moerun dryrun CONFIG --world N --rank R`: one rank of an N-rank training job on this machine, memory only."""

from __future__ import annotations

import argparse
import json
import sys

from launch.job import add_config_arguments, load_job_config

HELP = "run one rank of an N-rank training step on fake tensors; print its memory beside the planner's"
DESCRIPTION = """\
Runs rank R of an N-rank `moerun train` job, with the job's config, through one whole training step (its
pipeline schedule's forward and backward of every micro-batch, the gradient reductions and the ZeRO-1
AdamW update) on this machine: the real runtime code over torch's fake process group and FakeTensorMode,
so tensors have shapes but no storage and nothing is read from disk. It counts every tensor the step
allocates and prints the rank's parameter, gradient, optimizer-state and activation bytes and its peak,
next to the planner's prediction for the same rank (`moerun plan`'s cost model, recipe "moerun").

Memory only, no time: fake tensors do no arithmetic. Routing is taken as balanced (every expert gets its
share of tokens: fake tensors carry no routes). A large model takes minutes per rank (DeepSeek-V3 on 2048
ranks: docs/training.md, "Dry runs").

examples:
  moerun dryrun job.toml --world 2048 --rank 5
  moerun dryrun --set model.path=builtin:deepseek-v3 --set model.dtype=bfloat16 --set parallel.pp=16 \\
      --set parallel.ep=64 --set parallel.schedule=dualpipe --set parallel.microbatches=120 \\
      --set train.global_batch=15360 --set data.seq_len=4096 --world 2048 --rank 5 --rank 1029 --rank 1925"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world", type=int, required=True, help="ranks of the job (N)")
    parser.add_argument("--rank", type=int, action="append", required=True,
                        help="the rank to run (repeatable: each runs in turn)")
    parser.add_argument("--ranks-per-node", type=int, default=8,
                        help="ranks per node, for node-spanning groups (default 8)")
    parser.add_argument("--json", action="store_true", help="one JSON object per rank instead of the table")


def print_report(r: dict, plan: dict) -> None:
    lay = r["layout"]
    co = r["coords"]
    where = ", ".join(f"{d} {co[d]}/{lay[d]}" for d in ("pp", "dp", "tp", "ep"))
    layers = r["layers"]
    span = f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        f"layers {','.join(map(str, layers))}"
    print(f"rank {r['rank']} of {r['world']} ({where}), {r['schedule'] if lay['pp'] > 1 else 'no pipeline'}, "
          f"{r['microbatches']} micro-batches of {r['sequences_per_microbatch']} x {r['seq_len']} tokens, {span}")
    unit, div = ("GB", 1e9) if r["peak"] >= 1e9 else ("MB", 1e6)
    print(f"{unit:<40}{'dry run':>10}{'planner':>10}")
    rows = [("parameters", r["parameters"], plan["weights"]),
            ("gradients", r["gradients"], plan["weights"]),
            ("optimizer state (ZeRO-1 shard)", r["optimizer"], plan["optimizer"]),
            ("at the forward/backward peak:", None, None),
            ("  gradients allocated", r["gradients_at_peak"], plan["gradients"]),
            ("  activations and transients", r["activations"], plan["activations"] + plan["transient"]),
            ("peak, forward/backward", r["peak_forward_backward"], plan["peak_forward_backward"]),
            ("peak, whole step (incl. optimizer step)", r["peak"], plan["peak"])]
    for name, dry, pred in rows:
        print(name if dry is None else f"{name:<40}{dry / div:10.2f}{pred / div:10.2f}")
    err = (plan["peak"] - r["peak"]) / r["peak"] if r["peak"] else 0.0
    print(f"planner / dry run peak: {plan['peak'] / r['peak']:.3f} ({err:+.1%}); dry run {r['elapsed_s']:.0f} s, "
          f"{r['ops']:,} ops", flush=True)


def run(args: argparse.Namespace) -> int:
    from runtime.dryrun import dry_run, planner_prediction

    config = load_job_config(args)
    if args.world < 1:
        raise SystemExit("moerun dryrun: --world must be >= 1")
    bad = [r for r in args.rank if not 0 <= r < args.world]
    if bad:
        raise SystemExit(f"moerun dryrun: --rank {bad[0]} is outside a world of {args.world} ranks")
    for rank in args.rank:
        log = (lambda msg: None) if args.json else (lambda msg: print(f"dryrun: {msg}", file=sys.stderr,
                                                                      flush=True))
        try:
            plan = planner_prediction(config, args.world, rank, args.ranks_per_node)
            report = dry_run(config, args.world, rank, args.ranks_per_node, log=log)
        except ValueError as exc:
            raise SystemExit(f"moerun dryrun: {exc}") from None
        if args.json:
            print(json.dumps({"dry_run": report, "planner": {k: float(v) for k, v in plan.items()}}))
        else:
            print_report(report, plan)
            if rank != args.rank[-1]:
                print()
    return 0
