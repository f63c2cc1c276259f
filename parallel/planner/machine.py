"""A machine the planner has measured (`moerun plan --calibrate`) instead of one from the hardware table.

The profile holds what runtime/calibrate.py measured with R ranks running at once (the sharing a job of R
ranks on this machine sees): matmul throughput at a grid of shapes, causal attention forward and backward,
memory bandwidth, the cost of one framework op, and latency + bandwidth of all-to-all, all-reduce,
all-gather and point-to-point transfers per group size. The cost model asks it for the same quantities it
takes from the hardware table for a GPU: seconds of a GEMM, of the attention core, of memory-bound work,
of a collective. Pure Python (no torch), like the rest of the planner.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .hardware import GPU


@dataclass(frozen=True)
class Link:
    """time(bytes) = latency + bytes / bandwidth, from two measured sizes."""

    latency_s: float
    gbps: float

    def seconds(self, nbytes: float, calls: float = 1.0) -> float:
        return calls * self.latency_s + nbytes / (self.gbps * 1e9)


@dataclass(frozen=True)
class MachineProfile:
    name: str
    ranks: int                                  # ranks that ran the measurements at once
    gemm: dict[str, list[tuple[int, int, int, float]]]   # dtype (+ "/grouped") -> [(M, N, K, GFLOPS)]
    attention: dict[str, dict[str, list[tuple[int, float]]]]  # dtype -> fwd / bwd -> [(tokens, GFLOPS)]
    mem_gbps: float                             # memory-bound element-wise work, bytes read + written
    op_s: float                                 # one framework op of a training step (dispatch, autograd)
    links: dict[str, dict[str, Link]] = field(default_factory=dict)  # kind -> group size -> Link
    notes: dict = field(default_factory=dict)   # when, load average, threads

    # -- what the cost model asks
    def gemm_s(self, m: float, n: int, k: int, dtype: str, grouped: bool = False) -> float:
        """Seconds of an (m x k) @ (k x n) GEMM (m rows per expert when `grouped`) at the rate measured for the
        nearest shape in log space (of a linear layer's, or the grouped experts', forward + backward)."""
        if m <= 0:
            return 0.0
        rows = (grouped and self.gemm.get(dtype + "/grouped")) or self.gemm.get(dtype) or next(iter(self.gemm.values()))
        _, _, _, gflops = min(rows, key=lambda r: sum(math.log(a / b) ** 2 for a, b in zip(r[:3], (m, n, k))))
        return 2.0 * m * n * k / (gflops * 1e9)

    def attention_s(self, tokens: float, flops: float, dtype: str, backward: bool = False) -> float:
        """Seconds of causal attention doing `flops`, at the rate measured for the nearest sequence length."""
        rows = (self.attention.get(dtype) or next(iter(self.attention.values())))["bwd" if backward else "fwd"]
        _, gflops = min(rows, key=lambda r: abs(math.log(r[0] / max(tokens, 1.0))))
        return flops / (gflops * 1e9)

    def link(self, kind: str, group: int) -> Link:
        """The measured `kind` ("all_to_all", "all_reduce", "all_gather", "p2p") for a group of `group` ranks
        (the nearest measured size)."""
        table = self.links.get(kind)
        if not table:
            raise ValueError(f"the machine profile has no {kind} measurement (calibrated with {self.ranks} rank(s)); "
                             "calibrate with as many ranks as the job has")
        key = min(table, key=lambda g: abs(int(g) - group))
        return table[key]

    def moerun_alltoall(self, tokens: float, ep: int, topk: int, hidden: int, b: int) -> tuple[float, dict]:
        """Seconds of moerun's dispatch + combine of `tokens` over `ep` ranks: a token goes once to each other
        rank holding one of its experts, in the model dtype (`b` bytes) both ways; a dispatch is two
        all-to-alls (counts, rows), a combine one."""
        touched = ep * (1 - (1 - 1 / ep) ** topk)
        per_token = touched * (1 - 1 / ep) * 2 * b * hidden
        return self.link("all_to_all", ep).seconds(tokens * per_token, calls=3), {"ep_bytes_per_token": per_token}

    # -- files
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> MachineProfile:
        links = {k: {g: Link(**v) for g, v in t.items()} for k, t in d.get("links", {}).items()}
        gemm = {k: [tuple(r) for r in v] for k, v in d["gemm"].items()}
        attention = {k: {p: [tuple(r) for r in rows] for p, rows in v.items()} for k, v in d["attention"].items()}
        return cls(d["name"], int(d["ranks"]), gemm, attention, float(d["mem_gbps"]), float(d["op_s"]), links,
                   d.get("notes", {}))

    @classmethod
    def load(cls, path: str) -> MachineProfile:
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_dict(json.load(fh))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a machine profile written by `moerun plan --calibrate` ({e})") from None

    def as_gpu(self, memory_gb: float = 1e6) -> GPU:
        """A GPU record for the planner whose figures come from this profile (`GPU.measured`)."""
        gemm = max(r[3] for rows in self.gemm.values() for r in rows) / 1e3
        a2a = self.link("all_to_all", self.ranks).gbps if self.links.get("all_to_all") else 0.0
        return GPU(name=self.name, sms=0, bf16_tflops=gemm, fp8_tflops=gemm, hbm_gb=memory_gb,
                   hbm_tbps=self.mem_gbps / 1e3, nvlink_gbps=a2a, ib_gbps=a2a, ep_internode_gbps=(), measured=self)
