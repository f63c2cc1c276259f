"""Expert placement for serving with redundant experts (what DeepSeek's EPLB does, written from scratch).

Given per-expert loads (tokens routed to each expert, per layer), G GPUs with S = (E + R) / G expert slots
each, and R redundant slots: replicate the hottest experts (a token of an expert with c replicas goes to any
of them, so each replica carries load/c), then pack the replicas onto GPUs so that the largest per-GPU load
is as small as possible.

- Replication: R times, give one more replica to the expert with the largest load per replica (this is
  optimal for minimising the largest replica load), then move single replicas between experts while that
  lowers the packed maximum.
- Packing: longest-processing-time first (heaviest replica to the least-loaded GPU that still has a free
  slot and does not hold that expert yet), then a local search that moves or swaps replicas between the
  most-loaded GPU and the others while that lowers the maximum.
- Node-aware (groups K > 1, nodes N > 1): expert groups (DeepSeek's routing groups) are first packed onto nodes
  by LPT with an equal number of groups per node, so tokens that group-limited routing sends to a node stay
  within it; then each node replicates and packs its own experts with R / N redundant slots.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerPlacement:
    slots: list[list[int]]       # slots[gpu] = logical expert ids held by that GPU
    replicas: list[int]          # replicas[expert] = number of copies
    gpu_load: list[float]        # load per GPU after placement
    before_max_over_mean: float  # contiguous placement, no redundancy
    after_max_over_mean: float

    def as_dict(self) -> dict:
        return {"slots": self.slots, "replicas": self.replicas,
                "gpu_load": [round(x, 6) for x in self.gpu_load],
                "max_over_mean_before": round(self.before_max_over_mean, 4),
                "max_over_mean_after": round(self.after_max_over_mean, 4)}


def max_over_mean(gpu_load) -> float:
    a = np.asarray(gpu_load, dtype=float)
    mean = a.mean()
    return float(a.max() / mean) if mean > 0 else 1.0


def contiguous_load(load: np.ndarray, gpus: int) -> np.ndarray:
    """Per-GPU load of the layout without any balancing: experts in order, in G contiguous runs as equal as
    possible (expert e on GPU e // (E / G) when G divides E; with more GPUs than experts some hold none)."""
    a = np.asarray(load, dtype=float)
    return np.array([part.sum() for part in np.array_split(a, gpus)])


def replicate(load: np.ndarray, extra: int) -> list[int]:
    """Replica counts: each extra slot to the expert with the largest load per replica."""
    counts = [1] * len(load)
    heap = [(-float(x), i) for i, x in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(extra):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(load[i]) / counts[i], i))
    return counts


def pack(items: list[tuple[float, int]], bins: int, cap: int, iters: int = 200) -> list[list[tuple[float, int]]]:
    """Items (weight, expert id) into `bins` bins of `cap` items each, minimising the heaviest bin."""
    if len(items) != bins * cap:
        raise ValueError(f"{len(items)} replicas for {bins} GPUs x {cap} slots")
    order = sorted(items, key=lambda x: -x[0])
    best = None
    bound = max(sum(w for w, _ in items) / bins, order[0][0])
    for start in ("lpt", "snake"):
        if best is not None and best[0] <= 1.001 * bound:
            break
        content = _initial(order, bins, cap, start)
        content = _improve(content, iters)
        top = max(sum(w for w, _ in b) for b in content)
        if best is None or top < best[0] - 1e-12:
            best = (top, content)
    return best[1]


def _initial(order: list[tuple[float, int]], bins: int, cap: int, start: str) -> list[list[tuple[float, int]]]:
    """LPT (heaviest item to the lightest bin with room, avoiding a second copy of an expert) or snake order."""
    content: list[list[tuple[float, int]]] = [[] for _ in range(bins)]
    if start == "snake":
        for i, it in enumerate(order):
            rnd, pos = divmod(i, bins)
            content[pos if rnd % 2 == 0 else bins - 1 - pos].append(it)
        return content
    weight = [0.0] * bins
    for w, e in order:
        free = [b for b in range(bins) if len(content[b]) < cap]
        fresh = [b for b in free if all(x[1] != e for x in content[b])] or free
        b = min(fresh, key=lambda i: (weight[i], i))
        content[b].append((w, e))
        weight[b] += w
    return content


def _improve(content: list[list[tuple[float, int]]], iters: int) -> list[list[tuple[float, int]]]:
    weight = [sum(w for w, _ in b) for b in content]
    # local search: swap an item of the heaviest bin with a lighter item elsewhere while the maximum drops
    for _ in range(iters):
        W = np.array([[x[0] for x in c] for c in content])          # bins x cap
        tot = np.array(weight)
        hi = int(np.argmax(tot))
        D = W[hi][None, :, None] - W[:, None, :]                        # D[lo, a, b] = w(hi, a) - w(lo, b)
        new_max = np.maximum(tot[hi] - D, tot[:, None, None] + D)
        new_max[hi] = np.inf
        new_max[D <= 1e-12] = np.inf
        lo, a_i, b_i = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
        if not new_max[lo, a_i, b_i] < tot[hi] - 1e-12:
            break
        a, b = content[hi][a_i], content[lo][b_i]
        content[hi][a_i], content[lo][b_i] = b, a
        weight[hi] += b[0] - a[0]
        weight[lo] += a[0] - b[0]
    return content


def _pack_counts(load: np.ndarray, counts: list[int], bins: int, cap: int):
    items = [(float(load[i]) / c, i) for i, c in enumerate(counts) for _ in range(c)]
    packed = pack(items, bins, cap)
    return packed, max(sum(w for w, _ in b) for b in packed)


def _replicate_and_pack(load: np.ndarray, extra: int, bins: int, cap: int, rounds: int = 8):
    """Replica counts and packing, improved together: start from `replicate`, then move one replica from a
    replicated expert to another expert while that lowers the packed maximum (the counts that minimise the
    largest replica are not always the ones that pack best: a cold expert's two half-size replicas can fill
    gaps). Small layers try every move; large ones the experts of the heaviest GPU and the coldest ones."""
    counts = replicate(load, extra)
    packed, best = _pack_counts(load, counts, bins, cap)
    E = len(load)
    if math.comb(E + extra - 1, extra) <= 400:  # few ways to hand out the extra slots: try them all
        for cuts in itertools.combinations(range(E + extra - 1), extra):
            trial = [1] * E
            for j, c in enumerate(cuts):  # stars and bars: extra replica j goes to expert c - j
                trial[c - j] += 1
            if max(load[i] / trial[i] for i in range(E)) >= best:
                continue
            tp, tm = _pack_counts(load, trial, bins, cap)
            if tm < best - 1e-12:
                counts, packed, best = trial, tp, tm
        return counts, packed
    for _ in range(rounds):
        if best <= 1.001 * max(float(load.sum()) / bins, max(load[i] / counts[i] for i in range(E))):
            break  # at the lower bound (mean load, or the largest replica) already
        hi = max(packed, key=lambda b: sum(w for w, _ in b))
        if len(load) <= 32:  # small: try every move
            takers = list(range(len(load)))
            givers = [e for e, c in enumerate(counts) if c > 1]
        else:  # experts on the heaviest GPU, and the coldest experts (their replicas make small fillers)
            on_hi = sorted({e for _, e in hi}, key=lambda e: -load[e] / counts[e])[:3]
            takers = on_hi + [int(e) for e in np.argsort(load)[:2] if int(e) not in on_hi]
            givers = sorted((e for e, c in enumerate(counts) if c > 1), key=lambda e: load[e] / counts[e])[:3]
        moved = False
        for b in takers:
            for a in givers:
                if a == b:
                    continue
                trial = list(counts)
                trial[a] -= 1
                trial[b] += 1
                tp, tm = _pack_counts(load, trial, bins, cap)
                if tm < best - 1e-12:
                    counts, packed, best, moved = trial, tp, tm, True
                    break
            if moved:
                break
        if not moved:
            break
    return counts, packed


def place_layer(load, gpus: int, redundant: int = 0, nodes: int = 1, groups: int = 1) -> LayerPlacement:
    """Placement of one layer's experts; see the module docstring."""
    load = np.asarray(load, dtype=float)
    if load.ndim != 1 or len(load) == 0:
        raise ValueError(f"per-layer load must be a non-empty 1-D array, got shape {load.shape}")
    if np.any(load < 0) or not np.all(np.isfinite(load)):
        raise ValueError("expert loads must be finite and >= 0")
    E = len(load)
    if gpus < 1 or redundant < 0 or nodes < 1 or groups < 1:
        raise ValueError(f"need gpus, nodes, groups >= 1 and redundant >= 0, "
                         f"got {gpus}, {nodes}, {groups}, {redundant}")
    if (E + redundant) % gpus:
        raise ValueError(f"{E} experts + {redundant} redundant slots do not fill {gpus} GPUs evenly")
    if gpus % nodes:
        raise ValueError(f"{gpus} GPUs do not split evenly over {nodes} nodes")
    node_aware = nodes > 1 and groups > 1
    if node_aware and (groups % nodes or E % groups or redundant % nodes):
        raise ValueError(f"node-aware placement needs groups ({groups}) and redundant slots ({redundant}) "
                         f"divisible by nodes ({nodes}) and experts ({E}) by groups")
    cap = (E + redundant) // gpus
    if not node_aware:  # one pool: GPUs are interchangeable
        node_experts = [list(range(E))]
    else:
        size = E // groups
        gload = [(float(load[g * size:(g + 1) * size].sum()), g) for g in range(groups)]
        packed = pack(gload, nodes, groups // nodes)
        node_experts = [sorted(e for _, g in node for e in range(g * size, (g + 1) * size)) for node in packed]
    gpn = gpus // len(node_experts)
    redundant_per = redundant // len(node_experts)
    slots: list[list[int]] = []
    replicas = [0] * E
    for experts in node_experts:
        sub = load[experts]
        counts, bins = _replicate_and_pack(sub, redundant_per, gpn, cap)
        for i, c in enumerate(counts):
            replicas[experts[i]] = c
        for b in bins:
            slots.append(sorted(experts[e] for _, e in b))
    gpu_load = [sum(load[e] / replicas[e] for e in s) for s in slots]
    before = max_over_mean(contiguous_load(load, gpus))
    return LayerPlacement(slots, replicas, gpu_load, before, max_over_mean(gpu_load))


def place(load, gpus: int, redundant: int = 0, nodes: int = 1, groups: int = 1) -> list[LayerPlacement]:
    """Per-layer placement of a (layers, experts) or (experts,) load array."""
    a = np.asarray(load, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"load must be (experts,) or (layers, experts), got shape {a.shape}")
    return [place_layer(row, gpus, redundant, nodes, groups) for row in a]
