"""`moerun plan`: rank parallel layouts by predicted memory and step time; `moerun plan experts`: placement.

No torch: the planner is pure Python + numpy, so this runs on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "rank parallel layouts by predicted memory and step time"
DESCRIPTION = """\
Rank parallel layouts (tp, pp, ep, dp, micro-batches, schedule, recompute) of an MLA/MoE model on a cluster
by predicted step time, keeping those that fit in GPU memory. The cost model and every constant's source
are in docs/tuning.md. Step time comes from the same pipeline simulator as `moerun schedule`.

  moerun plan --model deepseek-v3 --nodes 256 --gpus-per-node 8 --gpu h800
  moerun plan --model deepseek-v3 --nodes 256 --gpus-per-node 8 --gpu h800 --layout pp=16,ep=64,tp=1 --json
  moerun plan --model deepseek-v3 --nodes 256 --gpus-per-node 8 --gpu h800 --layout pp=16,ep=64,tp=1 \
      --kernels-of 2024-12
  moerun plan --model path/to/config.json --nodes 4 --gpus-per-node 8 --gpu h100 --top 5

The recommended layout ends with the `moerun train` flags that run it (`--toml`: the same as a TOML job
config). The planner's default recipe is DeepSeek-V3's published one (selective recompute, FP8 caching);
`--recipe moerun` plans for moerun's own trainer (no recompute; the memory `moerun dryrun` measures).

This machine: measure it, then predict `moerun train` step times on it (imports torch):

  moerun plan --calibrate --ranks 4 --machine-out machine.json
  moerun plan --machine machine.json --job job.toml --set parallel.pp=2 --set parallel.ep=2

Expert placement for serving with redundant experts (loads: .npy of shape (experts,) or (layers, experts)):

  moerun plan experts --load loads.npy --gpus 32 --nodes 4 --redundant 32 --groups 8 [--json] [--out P.json]
"""


def _number(text: str) -> float:
    """1e12, 14.8T, 500B, 2M -> float."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if t and t[-1] in mult:
            return float(t[:-1]) * mult[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (examples: 1e12, 14.8T, 500B)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("layouts", "experts"), default="layouts",
                   help="layouts (default) or experts (placement with redundant experts)")
    g = p.add_argument_group("layouts")
    g.add_argument("--model", help="deepseek-v3 | deepseek-v2 | deepseek-v2-lite | kimi-k2 | path to config.json")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    g.add_argument("--gpu", default="h800", help="h800 | h100 | h200 (default h800)")
    g.add_argument("--tokens", type=_number, default=1e12,
                   help="training tokens, for total GPU-hours and days (default 1e12; 14.8T works)")
    g.add_argument("--layout", help="fix some fields, search the rest: pp=16,ep=64,tp=1[,dp=,schedule=,mbs=,"
                                    "recompute=]")
    g.add_argument("--top", type=int, default=None,
                   help="how many layouts to show (default 10; with --layout, every matching one)")
    g.add_argument("--seq-len", type=int, default=4096, help="sequence length (default 4096, as DeepSeek-V3)")
    g.add_argument("--global-batch", type=int, default=15360,
                   help="sequences per optimizer step (default 15360, where V3's batch schedule ends)")
    g.add_argument("--batch-ramp", default="3072,469B",
                   help="START,TOKENS: the batch grows linearly from START sequences to --global-batch over "
                        "TOKENS tokens (default 3072,469B as DeepSeek-V3; 'none' = off); affects only the "
                        "totals over --tokens, not the steady-state GPU-hours per trillion tokens")
    g.add_argument("--precision", choices=("fp8", "bf16"), default="fp8", help="GEMM precision (default fp8)")
    g.add_argument("--kernels-of", default="latest", metavar="YYYY-MM",
                   help="when the run trains: the FP8 GEMM and attention kernels it has are the newest released "
                        "by then (2024-12, V3's report: CUTLASS 3.6-based FP8 GEMMs, FlashAttention-3; 2024-05, "
                        "V2's: FlashAttention-2; default latest: DeepGEMM, FlashAttention-3)")
    g.add_argument("--capacity-factor", type=float, default=0.0,
                   help="token dropping: each expert keeps at most this x its balanced share of rows (V2 "
                        "trained with 1.0; default 0: dropless, as V3)")
    g.add_argument("--load-imbalance", type=float, default=1.0,
                   help="max/mean routed tokens per GPU (default 1.0 = balanced)")
    g.add_argument("--reserve-gb", type=float, default=4.0,
                   help="memory kept for CUDA context, comm buffers, fragmentation (default 4)")
    g.add_argument("--recipe", choices=("v3", "moerun"), default="v3",
                   help="what training keeps in memory: v3 = DeepSeek-V3's published recipe (default), moerun = "
                        "moerun's own trainer (model-dtype weights and gradients, fp32 AdamW state, no recompute)")
    g.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="--recipe moerun: the model's dtype (default bfloat16)")
    g.add_argument("--toml", action="store_true", help="print the recommended layout as a TOML job config")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c = p.add_argument_group("this machine (imports torch)")
    c.add_argument("--calibrate", action="store_true",
                   help="measure matmul, attention, memory, op cost, all-to-all, all-reduce, all-gather and p2p "
                        "with --ranks local ranks at once")
    c.add_argument("--quick", action="store_true",
                   help="--calibrate: time each figure about 5x shorter (a first look in seconds; the figures are "
                        "noisier, so write a profile to plan with from a full calibration)")
    c.add_argument("--ranks", type=int, default=4, help="local ranks for --calibrate and --job (default 4)")
    c.add_argument("--machine", help="a machine profile written by --calibrate --machine-out")
    c.add_argument("--machine-out", help="write the measured machine profile (JSON) here")
    c.add_argument("--job", metavar="CONFIG",
                   help="predict the step time of this `moerun train` job config on --ranks local ranks of the "
                        "measured machine (with --set overrides)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--job: override a job config key (repeatable)")
    e = p.add_argument_group("experts")
    e.add_argument("--load", help=".npy with per-expert loads, shape (experts,) or (layers, experts)")
    e.add_argument("--gpus", type=int, help="GPUs serving the experts")
    e.add_argument("--redundant", type=int, default=0, help="extra expert slots for replicas (default 0)")
    e.add_argument("--groups", type=int, default=1, help="expert groups to keep within a node (default 1)")
    e.add_argument("--out", help="write the placement JSON here")


def run(args: argparse.Namespace) -> int:
    try:
        if args.what == "experts":
            return _run_experts(args)
        if args.calibrate or args.machine:
            from launch.commands.plan_machine import run_machine

            return run_machine(args)
        if args.job or args.overrides:
            raise ValueError("--job and --set need a machine: --calibrate or --machine PROFILE")
        if args.quick:
            raise ValueError("--quick applies to --calibrate")
        return _run_layouts(args)
    except ValueError as e:
        print(f"moerun plan: error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------- layouts

def _run_layouts(args: argparse.Namespace) -> int:
    from parallel.planner.costmodel import Setup
    from parallel.planner.hardware import get_gpu
    from parallel.planner.models import load_model
    from parallel.planner.search import Planner, parse_layout

    if not args.model or not args.nodes:
        raise ValueError("--model and --nodes are required (see moerun plan --help)")
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model = load_model(args.model)
    gpu = get_gpu(args.gpu)
    ramp_start, ramp_tokens = _batch_ramp(args.batch_ramp, args.global_batch)
    setup = Setup(seq_len=args.seq_len, global_batch=args.global_batch, precision=args.precision,
                  kernels_of=args.kernels_of, capacity_factor=args.capacity_factor,
                  gpus_per_node=args.gpus_per_node, reserve_gb=args.reserve_gb,
                  load_imbalance=args.load_imbalance,
                  batch_ramp_start=ramp_start, batch_ramp_tokens=ramp_tokens, recipe=args.recipe,
                  dtype_bytes=4 if args.dtype == "float32" else 2)
    planner = Planner(model, gpu, args.nodes, args.gpus_per_node, setup, tokens=args.tokens)
    fixed = parse_layout(args.layout) if args.layout else {}
    top = args.top if args.top is not None else (1 << 30 if fixed else 10)  # --layout: every match
    res = planner.search(fixed, top=top, include_unfit=bool(fixed))
    evs = res["evaluations"]
    rows = [ev.as_dict(planner.world, planner.s, model, gpu, args.tokens) for ev in evs]
    fitting = [r for r in rows if r["fits"]]
    best = fitting[0] if fitting else (rows[0] if rows else None)
    out = {
        "model": model.name, "gpu": gpu.name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "world": planner.world, "tokens": args.tokens,
        "setup": {"seq_len": setup.seq_len, "global_batch": setup.global_batch, "precision": setup.precision,
                  "kernels_of": setup.kernels_of, "kernels": setup.kernels,
                  "capacity_factor": setup.capacity_factor,
                  "load_imbalance": setup.load_imbalance, "reserve_gb": setup.reserve_gb,
                  "batch_ramp": {"start": setup.batch_ramp_start, "tokens": setup.batch_ramp_tokens}},
        "layout_filter": fixed, "candidates": res["candidates"], "fit_memory": res["fit_memory"],
        "elapsed_s": round(res["elapsed_s"], 3), "layouts": rows, "best": best,
    }
    if best:
        best["train_flags"] = train_flags(best, setup, args.dtype if args.recipe == "moerun" else None)
        best["train_toml"] = train_toml(best, setup, args.dtype if args.recipe == "moerun" else None)
    if args.toml:
        if not best:
            raise ValueError("no layout to print")
        print(best["train_toml"], end="")
        return 0
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if best else 1
    if not rows:
        why = "no layout fits in memory"
        if fixed:
            why = "no valid layout matches --layout"
            reason = _why_not(planner, fixed)
            if reason:
                why += f": {reason}"
        print(f"moerun plan: {why} ({res['candidates']} candidates)", file=sys.stderr)
        return 1
    _print_table(out)
    return 0


def _train_settings(row: dict, setup, dtype: str | None) -> dict[str, dict]:
    """The job config keys of a planned layout: moerun's names for the planner's layout and batch."""
    par = {"tp": row["tp"], "pp": row["pp"], "ep": row["ep"], "dp": row["dp"], "schedule": row["schedule"],
           "microbatches": row["microbatches"]}
    out = {"parallel": par, "train": {"global_batch": setup.global_batch}, "data": {"seq_len": setup.seq_len}}
    if dtype:
        out["model"] = {"dtype": dtype}
    elif setup.precision == "fp8":
        out["model"], out["train"]["fp8"] = {"dtype": "bfloat16"}, True
    return out


def train_flags(row: dict, setup, dtype: str | None = None) -> str:
    """`--set` flags of `moerun train` that run the planned layout (world = tp * pp * dp ranks)."""
    items = _train_settings(row, setup, dtype)
    return " ".join(f"--set {sec}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for sec, d in items.items() for k, v in d.items())


def train_toml(row: dict, setup, dtype: str | None = None) -> str:
    """The planned layout as a TOML job config (merge with the model and data of the job)."""
    lines = [f"# {row['tp'] * row['pp'] * row['dp']} ranks; planner: step {row['step_time_s']:.3g} s, "
             f"{row['memory_gb_per_gpu']:.1f} GB per GPU (recompute {row['recompute']} assumed)"]
    for sec, d in _train_settings(row, setup, dtype).items():
        lines.append(f"\n[{sec}]")
        for k, v in d.items():
            lines.append(f"{k} = " + (str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str)
                                      else str(v)))
    return "\n".join(lines) + "\n"


def _batch_ramp(text: str, global_batch: int) -> tuple[int, float]:
    """'3072,469B' -> (3072, 469e9); 'none' -> no ramp."""
    if text.strip().lower() in ("none", "off", "0"):
        return global_batch, 0.0
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"--batch-ramp {text!r}: expected START,TOKENS (e.g. 3072,469B) or none")
    try:
        start = int(parts[0])
        tokens = _number(parts[1])
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"--batch-ramp {text!r}: START must be an integer, TOKENS a number (469B)") from None
    if start < 1 or tokens < 0:
        raise ValueError(f"--batch-ramp {text!r}: need START >= 1 and TOKENS >= 0")
    return start, tokens


def _why_not(planner, fixed: dict) -> str | None:
    """The reason a layout built from the fixed fields (defaults for the rest) cannot run."""
    from parallel.planner.search import Candidate

    tp, pp = fixed.get("tp", 1), fixed.get("pp", 1)
    dp = fixed.get("dp", planner.world // max(1, tp * pp))
    sched = fixed.get("schedule", "1f1b" if pp == 1 else "dualpipe")
    lay = Candidate(tp, pp, fixed.get("ep", 1), dp, sched, fixed.get("mbs", 1), fixed.get("recompute", "selective"))
    return planner.check(lay)


def _print_table(out: dict) -> None:
    st = out["setup"]
    kernels = ", ".join(v for k, v in st["kernels"].items() if k != "fp8_gemm" or st["precision"] == "fp8")
    print(f"{out['model']} on {out['nodes']} x {out['gpus_per_node']} {out['gpu']} ({out['world']} GPUs), "
          f"seq {out['setup']['seq_len']}, batch {out['setup']['global_batch']} seqs, {out['setup']['precision']}"
          f" (kernels of {st['kernels_of']}: {kernels}); "
          f"{out['candidates']} layouts, {out['fit_memory']} fit in memory ({out['elapsed_s']:.2f} s)")
    head = ("#", "tp", "pp", "ep", "dp", "schedule", "mb", "mbs", "recompute", "mem GB", "step s", "bubble",
            "tok/s", "MFU", "GPU-h/1T")
    fmt = "{:>2} {:>3} {:>3} {:>4} {:>5} {:<9} {:>4} {:>3} {:<9} {:>6} {:>7} {:>6} {:>10} {:>5} {:>9}"
    print(fmt.format(*head))
    for i, r in enumerate(out["layouts"], 1):
        mem = f"{r['memory_gb_per_gpu']:.1f}" + ("" if r["fits"] else "!")
        print(fmt.format(i, r["tp"], r["pp"], r["ep"], r["dp"], r["schedule"], r["microbatches"],
                         r["micro_batch_sequences"], r["recompute"], mem, f"{r['step_time_s']:.2f}",
                         f"{100 * r['bubble_fraction']:.1f}%", f"{r['tokens_per_s']:.3g}", f"{r['mfu']:.2f}",
                         f"{r['gpu_hours_per_trillion_tokens']:,.0f}"))
    b = out["best"]
    if b:
        print(f"best: tp{b['tp']} pp{b['pp']} ep{b['ep']} dp{b['dp']} {b['schedule']}, "
              f"{b['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per trillion tokens, "
              f"{b['gpu_hours_total']:,.0f} GPU-hours / {b['days_total']} days for {out['tokens']:.3g} tokens"
              f" (batch ramp included)")
    if b:
        print(f"run it: moerun launch -n {b['tp'] * b['pp'] * b['dp']} -- train JOB.toml {b['train_flags']}")
        if b["recompute"] != "none":
            print(f"  (the planner assumed {b['recompute']} recompute, DeepSeek-V3's recipe; moerun's trainer does "
                  "not recompute: --recipe moerun plans its memory)")
    if any(not r["fits"] for r in out["layouts"]):
        print("! does not fit in GPU memory")
    print("MFU against the BF16 dense peak; mb = micro-batches per step, mbs = sequences per micro-batch")


# --------------------------------------------------------------------------------------------- experts

def _run_experts(args: argparse.Namespace) -> int:
    import numpy as np

    from parallel.planner.placement import place

    if not args.load or not args.gpus:
        raise ValueError("plan experts needs --load FILE.npy and --gpus G")
    try:
        load = np.load(args.load, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--load {args.load}: cannot read a .npy array ({e})") from None
    nodes = args.nodes or 1
    layers = place(load, args.gpus, args.redundant, nodes, args.groups)
    out = {"gpus": args.gpus, "nodes": nodes, "redundant": args.redundant, "groups": args.groups,
           "layers": [lp.as_dict() for lp in layers]}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{len(layers)} layer(s), {load.shape[-1]} experts on {args.gpus} GPUs / {nodes} node(s), "
          f"{args.redundant} redundant slots, {args.groups} group(s)")
    print(f"{'layer':>5} {'max/mean before':>16} {'after':>8}")
    for i, lp in enumerate(layers):
        print(f"{i:>5} {lp.before_max_over_mean:>16.3f} {lp.after_max_over_mean:>8.3f}")
    if args.out:
        print(f"placement written to {args.out}")
    return 0
