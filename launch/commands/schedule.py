"""`moerun schedule`: build a pipeline schedule, simulate it with given costs, print bubbles, draw it.

Pure Python (no torch): the schedule builders and simulator in parallel/pipeline need nothing else, so
this runs anywhere, on a login node too.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "build and simulate a pipeline schedule (bubbles, timeline)"
DESCRIPTION = """\
Build a pipeline schedule and simulate one training step of it with the given action costs.

  moerun schedule --kind {gpipe,1f1b,zb1p,dualpipe,dualpipev} --pp P --chunks M
                  [--cost f=1,b=2,w=1,fb=2.5,comm=0] [--json] [--trace FILE.json] [--png FILE.png]

P is the number of pipeline ranks (as parallel.pp; dualpipev then has 2P stages), M the number of
micro-batches of one step. Costs are times of one action of one stage chunk, in any unit:
  f forward, b full backward, w weight-gradient part of b (an input-grad backward I costs b - w),
  fb one overlapped forward & backward pair (default f + b: no overlap gain), comm p2p latency,
  a2a_f / a2a_b all-to-all time exposed by a standalone F / B (hidden inside an overlapped F&B).
A rank's bubble is its idle time in the step (makespan - busy); bubble_formula is the DualPipe README's
value for the kind (null for gpipe). See docs/pipeline.md.

examples:
  moerun schedule --kind dualpipev --pp 4 --chunks 10 --png dualpipev.png
  moerun schedule --kind 1f1b --pp 8 --chunks 32 --cost f=1,b=2,comm=0.1 --json
"""

KINDS = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


class CostError(ValueError):
    pass


def parse_costs(text: str | None, valid: list[str]) -> dict[str, float]:
    """'f=1,b=2' -> {'f': 1.0, 'b': 2.0}; unknown keys and bad numbers are errors naming the valid keys."""
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise CostError(f"--cost item {item!r} is not key=value (valid keys: {', '.join(valid)})")
        if key not in valid:
            raise CostError(f"unknown --cost key {key!r}; valid keys: {', '.join(valid)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise CostError(f"--cost {key}={value!r} is not a number") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True, choices=KINDS, help="schedule")
    parser.add_argument("--pp", type=int, required=True, metavar="P", help="pipeline ranks")
    parser.add_argument("--chunks", type=int, required=True, metavar="M", help="micro-batches per step")
    parser.add_argument("--cost", default="", metavar="K=V,...",
                        help="action costs, e.g. f=1,b=2,w=1,fb=2.5,comm=0 (default f=1,b=2,w=1)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (chrome://tracing)")
    parser.add_argument("--png", metavar="FILE.png", help="draw the timeline (needs matplotlib)")


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def result_dict(res, formula: float | None) -> dict:
    s = res.schedule

    def num(x: float | None) -> float | None:  # drop float noise such as 62.800000000000026
        return None if x is None else round(x, 9)

    return {
        "kind": s.kind, "pp": s.pp, "chunks": s.chunks, "costs": res.costs.as_dict(),
        "makespan": num(res.makespan),
        "ranks": [{"rank": r.rank, "busy": num(r.busy), "bubble": num(r.bubble),
                   "peak_activations": r.peak_activations} for r in res.ranks],
        "bubble_formula": num(formula),
    }


def run(args: argparse.Namespace) -> int:
    from parallel.pipeline import ScheduleError, build
    from parallel.pipeline.simulate import Costs, bubble_formula, simulate

    try:
        costs = Costs(**parse_costs(args.cost, Costs.names()))
        sched = build(args.kind, args.pp, args.chunks)
        res = simulate(sched, costs, check=False)
    except (CostError, ScheduleError) as e:
        print(f"moerun schedule: error: {e}", file=sys.stderr)
        return 2
    formula = bubble_formula(args.kind, args.pp, costs)
    try:
        if args.trace:
            from parallel.pipeline.trace import write_chrome_trace

            write_chrome_trace(res, args.trace)
        if args.png:
            from parallel.pipeline.trace import render_png

            render_png(res, args.png)
    except ImportError as e:
        print(f"moerun schedule: error: --png needs matplotlib ({e})", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"moerun schedule: error: cannot write {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result_dict(res, formula)))
        return 0
    c = res.costs.as_dict()
    print(f"{sched.kind}: {sched.pp} ranks, {sched.num_stages} stages, {sched.chunks} micro-batches; costs "
          + " ".join(f"{k}={_fmt(v)}" for k, v in c.items()))
    print(f"{'rank':>4}  {'busy':>10}  {'bubble':>10}  {'bubble%':>7}  {'peak act':>8}")
    for r in res.ranks:
        pct = 100.0 * r.bubble / res.makespan if res.makespan else 0.0
        print(f"{r.rank:>4}  {_fmt(r.busy):>10}  {_fmt(r.bubble):>10}  {pct:>6.1f}%  {r.peak_activations:>8}")
    print(f"makespan {_fmt(res.makespan)}; worst bubble {_fmt(res.worst_bubble)}; bubble formula (DualPipe README) "
          + ("n/a" if formula is None else _fmt(formula)))
    for label, path in (("trace", args.trace), ("png", args.png)):
        if path:
            print(f"{label}: {path}")
    return 0
