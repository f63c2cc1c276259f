"""`moerun plan --calibrate | --machine PROFILE [--job CONFIG --set ...]`: this machine's measured speeds, and
the planner's step time of a `moerun train` job on it (runtime/calibrate.py). Imports torch."""

from __future__ import annotations

import argparse
import json
import sys


def print_profile(profile) -> None:
    n = profile.notes
    print(f"{profile.name}: measured {n.get('measured_at', '?')} in {n.get('seconds', '?')} s, load average "
          f"{n.get('load_average', '?')}, {n.get('cpus', '?')} CPUs, {n.get('threads_per_rank', '?')} thread(s) "
          "per rank" + (" (--quick: noisier figures)" if n.get("quick") else ""))
    for dtype, rows in profile.gemm.items():
        rates = sorted(r[3] for r in rows)
        what = "grouped experts" if dtype.endswith("/grouped") else "linear layers"
        print(f"  {what} {dtype.split('/')[0]}, forward + backward: {rates[0]:.1f} - {rates[-1]:.1f} GFLOPS per "
              f"rank over {len(rows)} shapes "
              f"(median {rates[len(rates) // 2]:.1f})")
    for dtype, ph in profile.attention.items():
        fwd = ", ".join(f"{int(t)}: {g:.1f}" for t, g in ph["fwd"])
        bwd = ", ".join(f"{int(t)}: {g:.1f}" for t, g in ph["bwd"])
        print(f"  causal attention {dtype}, GFLOPS by tokens: forward {fwd}; backward {bwd}")
    print(f"  memory-bound work {profile.mem_gbps:.1f} GB/s per rank; one op of a training step "
          f"{profile.op_s * 1e6:.1f} us")
    for kind, table in profile.links.items():
        parts = ", ".join(f"{g} ranks {lk.latency_s * 1e6:.0f} us + {lk.gbps:.2f} GB/s" for g, lk in table.items())
        print(f"  {kind}: {parts}")


def run_machine(args: argparse.Namespace) -> int:
    from parallel.planner.machine import MachineProfile
    from runtime.calibrate import measure, predict_step
    from runtime.jobconfig import ConfigError, load_config

    log = (lambda msg: None) if args.json else (lambda msg: print(f"plan: {msg}", file=sys.stderr, flush=True))
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    if args.calibrate:
        try:
            profile = measure(args.ranks, log=log, quick=args.quick)
        except RuntimeError as exc:
            print(f"moerun plan: calibration failed: {exc}", file=sys.stderr)
            return 1
        if args.machine_out:
            with open(args.machine_out, "w", encoding="utf-8") as fh:
                fh.write(profile.to_json())
            log(f"machine profile written to {args.machine_out}")
    else:
        if args.quick:
            raise ValueError("--quick applies to --calibrate, not to a loaded --machine profile")
        profile = MachineProfile.load(args.machine)
    out: dict = {"machine": json.loads(profile.to_json())}
    if args.job or args.overrides:
        try:
            config = load_config(args.job, args.overrides)
        except ConfigError as exc:
            raise ValueError(f"--job: {exc}") from None
        out["job"] = {"ranks": args.ranks, "parallel": config["parallel"], "model": config["model"]["path"]}
        out["prediction"] = predict_step(config, profile, args.ranks, log=log)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print_profile(profile)
    if "prediction" in out:
        p, par = out["prediction"], config["parallel"]
        c = p["per_microbatch_costs_ms"]
        print(f"moerun train on {args.ranks} ranks (tp {par['tp']}, pp {par['pp']}, ep {par['ep']}, "
              f"{par['schedule'] if par['pp'] > 1 else 'no pipeline'}, {p['microbatches']} micro-batches): "
              f"predicted step {p['step_time_s']:.3f} s = pipeline {p['makespan_s']:.3f} (bubble "
              f"{100 * p['bubble_fraction']:.0f}%) + gradient sync {p['dp_sync_s']:.3f} + optimizer "
              f"{p['optimizer_s']:.3f}")
        print(f"  per micro-batch and stage: forward {c['f']:.1f} ms, backward {c['b']:.1f} ms, all-to-all "
              f"{c['a2a_f']:.1f} / {c['a2a_b']:.1f} ms, p2p {c['comm']:.2f} ms; framework overhead in these: "
              f"{p['overhead_ms']['forward']:.1f} / {p['overhead_ms']['backward']:.1f} ms "
              f"(+ {p['overhead_ms']['step']:.1f} ms per step)")
    return 0
