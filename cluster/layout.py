"""The parallel layout as pure arithmetic: (world, pp, dp, tp, ep, node map) -> group member lists.

Rank order puts TP innermost, then DP, then PP:  rank = p * (dp * tp) + d * tp + t.  Experts are sharded
over `ep` consecutive ranks of one pipeline stage (ep divides dp * tp), so TP and the densest EP traffic
stay inside a node; the `edp` group (expert data parallel, size dp * tp / ep) joins the ranks of a stage
that hold the same experts. No processes are needed, so layouts of thousands of ranks are testable.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DIMS", "Layout", "LayoutError"]

DIMS = ("tp", "pp", "dp", "ep", "edp", "world")


class LayoutError(ValueError):
    """A layout that does not fit the world: the message says what does not divide what."""


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int = 1
    dp: int = 0  # 0: world // (pp * tp)
    tp: int = 1
    ep: int = 1
    ranks_per_node: int | None = None  # None: the whole world is one node

    def __post_init__(self) -> None:
        for name in ("world", "pp", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dp, int) or self.dp < 0:
            raise LayoutError(f"dp must be >= 0 (0 means world / (tp*pp)), got {self.dp!r}")
        if self.world % (self.pp * self.tp):
            raise LayoutError(
                f"tp*pp = {self.tp}*{self.pp} = {self.tp * self.pp} "
                f"does not divide the world size {self.world}"
            )
        if self.dp == 0:
            object.__setattr__(self, "dp", self.world // (self.pp * self.tp))
        if self.pp * self.dp * self.tp != self.world:
            raise LayoutError(
                f"pp*dp*tp = {self.pp}*{self.dp}*{self.tp} = {self.pp * self.dp * self.tp} "
                f"is not the world size {self.world}"
            )
        if (self.dp * self.tp) % self.ep:
            raise LayoutError(
                f"ep={self.ep} does not divide dp*tp = {self.dp}*{self.tp} = {self.dp * self.tp} "
                f"(experts are sharded over ranks of one pipeline stage)"
            )
        rpn = self.ranks_per_node
        if rpn is not None and (rpn < 1 or self.world % rpn):
            raise LayoutError(f"ranks per node {rpn} does not divide the world size {self.world}")

    # --- coordinates ---------------------------------------------------------------------------------
    @property
    def stage_size(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        return self.stage_size // self.ep

    def size(self, dim: str) -> int:
        _check_dim(dim)
        return self.world if dim == "world" else getattr(self, dim)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every dimension (its position inside each of its groups)."""
        if not 0 <= rank < self.world:
            raise LayoutError(f"rank {rank} is outside world size {self.world}")
        p, within = divmod(rank, self.stage_size)
        d, t = divmod(within, self.tp)
        k, e = divmod(within, self.ep)
        return {"pp": p, "dp": d, "tp": t, "ep": e, "edp": k, "world": rank}

    def node_of(self, rank: int) -> int:
        return 0 if self.ranks_per_node is None else rank // self.ranks_per_node

    @property
    def num_nodes(self) -> int:
        return 1 if self.ranks_per_node is None else self.world // self.ranks_per_node

    # --- groups --------------------------------------------------------------------------------------
    def groups(self, dim: str) -> list[list[int]]:
        """Every group of one kind, each a sorted member list; together they partition the world."""
        _check_dim(dim)
        S, tp, ep = self.stage_size, self.tp, self.ep
        if dim == "world":
            return [list(range(self.world))]
        if dim == "tp":
            return [list(range(s, s + tp)) for s in range(0, self.world, tp)]
        if dim == "dp":
            return [[p * S + d * tp + t for d in range(self.dp)] for p in range(self.pp) for t in range(tp)]
        if dim == "pp":
            return [[p * S + w for p in range(self.pp)] for w in range(S)]
        if dim == "ep":
            return [list(range(s, s + ep)) for s in range(0, self.world, ep)]
        # edp: same stage, same position inside the ep group
        return [[p * S + k * ep + e for k in range(self.edp)] for p in range(self.pp) for e in range(ep)]

    def group_of(self, dim: str, rank: int) -> list[int]:
        """Members of `rank`'s group of one kind, computed directly (no enumeration of all groups)."""
        c = self.coords(rank)
        S, tp, ep = self.stage_size, self.tp, self.ep
        p, t, e = c["pp"], c["tp"], c["ep"]
        if dim == "world":
            return list(range(self.world))
        if dim == "tp":
            return list(range(rank - t, rank - t + tp))
        if dim == "dp":
            return [p * S + d * tp + t for d in range(self.dp)]
        if dim == "pp":
            return [q * S + rank % S for q in range(self.pp)]
        if dim == "ep":
            return list(range(rank - e, rank - e + ep))
        if dim == "edp":
            return [p * S + k * ep + e for k in range(self.edp)]
        _check_dim(dim)
        raise AssertionError(dim)

    def describe(self) -> str:
        return f"pp={self.pp} dp={self.dp} tp={self.tp} ep={self.ep} edp={self.edp}"


def _check_dim(dim: str) -> None:
    if dim not in DIMS:
        raise LayoutError(f"unknown mesh dimension {dim!r}; valid: {', '.join(DIMS)}")
