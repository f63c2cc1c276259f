"""metrics.jsonl (the Training output contract), the per-step progress line and the end-of-run summary."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, TextIO


class MetricsFile:
    """Appends one JSON object per optimizer step to `<out>/metrics.jsonl` (rank 0 only).

    On resume from step N the lines of steps > N (written by the killed run after its last checkpoint)
    are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, out: str, resume_step: int = 0) -> None:
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")
        keep: list[str] = []
        if resume_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line from a kill
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(out: str) -> list[dict[str, Any]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _hms(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(m: dict[str, Any], total_steps: int, eta_s: float) -> str:
    extra = "".join(f" | {k} {m[k]:.4f}" for k in ("mtp", "aux") if k in m)
    return (f"step {m['step']}/{total_steps} | loss {m['loss']:.4f}{extra} | lr {m['lr']:.3e} | "
            f"grad_norm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | ETA {_hms(eta_s)}")


def peak_memory_bytes(device=None) -> int:
    """Peak accelerator memory on GPU, else the process's peak resident set size."""
    try:
        import torch

        if device is not None and getattr(device, "type", "cpu") == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
    except ImportError:  # pragma: no cover
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def print_summary(summary: dict[str, Any], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    gib = summary["peak_memory_bytes"] / 2**30
    first = summary["first_loss"]
    fall = (summary["last_loss"] - first) / first if first else 0.0
    stream.write(
        f"done: {summary['steps']} steps ({summary['first_step']}..{summary['last_step']}), "
        f"{summary['tokens']} tokens in {summary['time_s']:.1f} s = {summary['tokens_per_s']:.0f} tokens/s; "
        f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} ({fall:+.0%}); peak memory {gib:.2f} GiB "
        f"(rank 0)\n")
    stream.flush()
