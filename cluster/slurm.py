"""Slurm's compressed notations, parsed exactly and in order.

Slurm hands each task its step's hosts as a compressed list (`node[01-04,07],gpu-a[1-2]`) and its tasks
per node as `2(x2),1`. The first host of the expanded list is where SLURM_NODEID 0 runs, so the expansion
must keep Slurm's order: comma-separated items left to right, and within one item with several bracket
groups, the leftmost group varies slowest (`rack[1-2]-node[01-02]` -> rack1-node01, rack1-node02, ...).
"""

from __future__ import annotations

import itertools
import re

__all__ = ["expand_hostlist", "parse_tasks_per_node"]

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {text!r}: unclosed '['")
    items.append(text[start:])
    return items


def _expand_ranges(body: str, whole: str) -> list[str]:
    """`01-04,07` -> ['01', '02', '03', '04', '07'], keeping the lower bound's zero padding."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"hostlist {whole!r}: bad range {part!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"hostlist {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in Slurm's order."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("hostlist is empty")
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        item = item.strip()
        if not item:
            raise ValueError(f"hostlist {text!r}: empty item")
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for piece in pieces:
            if piece.startswith("["):
                choices.append(_expand_ranges(piece[1:-1], text))
            elif "]" in piece or "[" in piece:
                raise ValueError(f"hostlist {text!r}: unbalanced bracket in {item!r}")
            elif piece:
                choices.append([piece])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """`2(x2),1` -> [2, 2, 1]: tasks on each node of the step, node 0 first."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("tasks-per-node is empty")
    counts: list[int] = []
    for part in text.split(","):
        m = _TASKS.match(part.strip())
        if not m:
            raise ValueError(f"tasks-per-node {text!r}: bad item {part!r} (expected N or N(xM))")
        repeat = int(m.group(2) or 1)
        if repeat < 1:
            raise ValueError(f"tasks-per-node {text!r}: repeat count must be >= 1 in {part!r}")
        counts.extend([int(m.group(1))] * repeat)
    return counts
