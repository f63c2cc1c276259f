"""Pictures of a simulated schedule: Chrome trace JSON and a PNG timeline (matplotlib imported lazily).

The PNG follows the DualPipe README figure: one row per rank, one box per compute action labelled with its
micro-batch, F / B / I / W in distinct colours, an overlapped F&B drawn as one outlined box whose top half is
the forward and bottom half the backward. Hatched boxes are chunk 1 (DualPipe: micro-batches of the reverse
direction; DualPipeV: stages P..2P-1, the way back up the V).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .schedule import FB

if TYPE_CHECKING:
    from .simulate import SimResult

US_PER_UNIT = 1000.0  # Chrome trace: one cost unit is drawn as one millisecond

COLORS = {"F": "#f6c344", "B": "#5b9bd5", "I": "#9fc5e8", "W": "#8fd18b"}
LABELS = {"F": "F forward", "B": "B full backward", "I": "I input-grad backward", "W": "W weight grad"}


def chrome_trace(res: SimResult) -> dict:
    """Trace-event JSON: process = the schedule, thread = a rank, one complete ("X") event per action."""
    s = res.schedule
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": 0,
         "args": {"name": f"{s.kind} pp={s.pp} chunks={s.chunks}"}},
    ]
    for r in range(s.pp):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": r, "args": {"sort_index": r}})
    for sp in res.spans:
        a = sp.action
        args = {"stage": a.stage, "mb": a.mb, "chunk": a.chunk, "phase": a.phase}
        if a.kind == FB:
            args.update(b_stage=a.b_stage, b_mb=a.b_mb, b_chunk=a.b_chunk)
        events.append({
            "name": str(a), "cat": a.kind, "ph": "X", "pid": 0, "tid": sp.rank,
            "ts": round(sp.start * US_PER_UNIT, 3), "dur": round((sp.end - sp.start) * US_PER_UNIT, 3),
            "args": args,
        })
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"kind": s.kind, "pp": s.pp, "chunks": s.chunks, "costs": res.costs.as_dict(),
                      "makespan": res.makespan, "unit": "1 cost unit = 1 ms"},
    }


def write_chrome_trace(res: SimResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(chrome_trace(res), fh)


def render_png(res: SimResult, path: str, title: str | None = None, dpi: int = 110) -> None:
    """Draw the timeline of `res` to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    s = res.schedule
    span = max(res.makespan, 1e-9)
    shortest = min((x.end - x.start for x in res.spans if x.end > x.start), default=span)
    width = min(30.0, max(9.0, 0.2 * span / shortest))  # the shortest action gets ~0.2 inch
    height = 0.55 * s.pp + 1.2
    fig, ax = plt.subplots(figsize=(width, height))
    unit_pts = width * 72 * 0.85 / span  # points per cost unit
    font = max(4.0, min(9.0, 0.6 * shortest * unit_pts))  # one label size for the whole picture
    row_h = 0.84

    def box(x0: float, x1: float, y0: float, h: float, kind: str, mb: int, chunk: int) -> None:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, h, facecolor=COLORS[kind], edgecolor="#333333",
                               linewidth=0.5, hatch="///" if chunk == 1 else None))
        if (x1 - x0) * unit_pts >= 1.2 * font:
            ax.text((x0 + x1) / 2, y0 + h / 2, str(mb), ha="center", va="center", fontsize=font,
                    fontweight="bold", bbox={"boxstyle": "square,pad=0.05", "fc": COLORS[kind], "ec": "none"}
                    if chunk == 1 else None)

    for sp in res.spans:
        a = sp.action
        y = sp.rank - row_h / 2
        if a.kind == FB:
            box(sp.start, sp.end, y, row_h / 2, "F", a.mb, a.chunk)  # the y axis points down: top half
            box(sp.start, sp.end, y + row_h / 2, row_h / 2, "B", a.b_mb, a.b_chunk)
            ax.add_patch(Rectangle((sp.start, y), sp.end - sp.start, row_h, fill=False, edgecolor="black",
                                   linewidth=1.6))
        else:
            box(sp.start, sp.end, y, row_h, a.kind, a.mb, a.chunk)

    ax.set_xlim(0, span)
    ax.set_ylim(s.pp - 0.5, -0.5)
    ax.set_yticks(range(s.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(s.pp)])
    ax.set_xlabel("time (cost units)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    c = res.costs.as_dict()
    cost_txt = ", ".join(f"{k}={c[k]:g}" for k in ("f", "b", "w", "fb", "comm"))
    ax.set_title(title or f"{s.kind}: {s.pp} ranks, {s.num_stages} stages, {s.chunks} micro-batches "
                 f"({cost_txt})  makespan {res.makespan:g}, worst bubble {res.worst_bubble:g}", fontsize=10)
    kinds_used = {x.action.kind for x in res.spans}
    handles = [Patch(facecolor=COLORS[k], edgecolor="#333333", label=LABELS[k])
               for k in ("F", "B", "I", "W") if k in kinds_used or (k in "FB" and FB in kinds_used)]
    if FB in kinds_used:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6,
                             label="overlapped F&B (top: F, bottom: B)"))
    if any(x.action.chunk == 1 for x in res.spans):
        note = "reverse direction" if s.kind == "dualpipe" else f"stages {s.pp}..{2 * s.pp - 1}"
        handles.append(Patch(facecolor="white", edgecolor="#333333", hatch="///", label=f"chunk 1 ({note})"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.55 / height - 0.02),
              ncol=len(handles), fontsize=8, frameon=False)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
