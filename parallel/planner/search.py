"""Layouts: enumerate (tp, pp, ep, dp, schedule, micro-batch size, recompute), evaluate memory and step time.

A layout is evaluated in four steps: unit costs (costmodel), a balanced split of the units into pipeline
stages (the schedule decides which stages share a rank), memory per GPU, and step time = pipeline makespan
from the shared simulator + the ZeRO-1 gradient reduce-scatter / parameter all-gather + the optimizer.
The search prunes by memory first, then evaluates layouts in order of a lower bound of their step time
and stops when the bound exceeds the K-th best time found (branch and bound: the top K are exact).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from parallel.pipeline.schedule import SEND, layer_split

from . import runtime_memory as rm
from .costmodel import RECOMPUTE, CostModel, Par, Setup, param_counts
from .hardware import GPU, HBM_EFFICIENCY, P2P_LATENCY_S
from .models import ModelSpec
from .pipeline_time import SIM_KINDS, PipelineError, min_chunks, pipeline_time, valid_chunks
from .rank_memory import rank_actions, rank_peak
from .stage_split import (
    AB,
    ACT,
    AF,
    B_,
    F_,
    PD,
    PE,
    TB,
    TF,
    TIME,
    TR,
    W_,
    partition,
    rank_stages,
    stage_matrix,
    unit_matrix,
    visit_weight,
)

OVERLAP_KINDS = ("dualpipe", "dualpipev")
W_BYTES, G_BYTES, OPT_BYTES = 2, 4, 8  # BF16 weights, FP32 gradients, FP32 master + BF16 AdamW moments (V3)


@dataclass(frozen=True)
class Candidate:
    """One layout the planner weighs: parallel sizes plus the schedule, micro-batch size and recompute policy
    (cluster.layout.Layout is the rank arithmetic of a chosen one)."""

    tp: int
    pp: int
    ep: int
    dp: int
    schedule: str
    mbs: int            # sequences per micro-batch
    recompute: str

    def label(self) -> str:
        return f"tp{self.tp} pp{self.pp} ep{self.ep} dp{self.dp} {self.schedule} mbs{self.mbs} {self.recompute}"


@dataclass
class Evaluation:
    layout: Candidate
    microbatches: int
    fits: bool
    memory_gb: float
    memory: dict
    step_time_s: float = math.inf
    makespan_s: float = 0.0
    bubble_fraction: float = 0.0
    dp_sync_s: float = 0.0
    optimizer_s: float = 0.0
    stage_layers: list[int] = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    ep_bytes_per_token: float = 0.0
    simulated_chunks: tuple[int, ...] = ()
    per_sequence_s: float = 0.0   # step time added by each further sequence of the global batch


    def as_dict(self, world: int, setup: Setup, model: ModelSpec, gpu: GPU, tokens: float) -> dict:
        lay = self.layout
        tok_step = setup.global_batch * setup.seq_len
        tps = tok_step / self.step_time_s if self.step_time_s < math.inf else 0.0
        gh = world * self.step_time_s / 3600.0 * 1e12 / tok_step if tps else math.inf
        total_s = ramp_seconds(self.step_time_s, self.per_sequence_s, setup, tokens) if tps else math.inf
        gh_total = world * total_s / 3600.0
        flops_tok = model_flops_per_token(model, setup.seq_len)
        return {
            "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "dp": lay.dp, "edp": max(1, lay.dp * lay.tp // lay.ep),
            "schedule": lay.schedule, "microbatches": self.microbatches, "micro_batch_sequences": lay.mbs,
            "recompute": lay.recompute, "fits": self.fits,
            "memory_gb_per_gpu": round(self.memory_gb, 2),
            "memory_breakdown_gb": {k: round(v / 1e9, 2) for k, v in self.memory.items()},
            "step_time_s": round(self.step_time_s, 4),
            "pipeline_makespan_s": round(self.makespan_s, 4),
            "dp_sync_s": round(self.dp_sync_s, 4), "optimizer_s": round(self.optimizer_s, 4),
            "tokens_per_s": round(tps, 1),
            "mfu": round(flops_tok * tps / (world * gpu.bf16_tflops * 1e12), 4),
            "mfu_fp8_peak": round(flops_tok * tps / (world * gpu.fp8_tflops * 1e12), 4),
            "bubble_fraction": round(self.bubble_fraction, 4),
            "gpu_hours_per_trillion_tokens": round(gh, 0),
            "gpu_hours_total": round(gh_total, 0),
            "gpu_hours_per_trillion_tokens_avg": round(gh_total * 1e12 / tokens, 0) if tokens > 0 else None,
            "days_total": round(total_s / 86400.0, 2),
            "stage_layers": self.stage_layers,
            "per_microbatch_costs_ms": {k: round(v * 1e3, 3) for k, v in self.costs.items()},
            "ep_bytes_per_token_per_layer": round(self.ep_bytes_per_token, 0),
            "simulated_chunks": list(self.simulated_chunks),
        }


def model_flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no recompute): 6 x activated matmul parameters plus
    attention scores; MTP modules included, embedding lookups excluded."""
    pc = param_counts(m)
    matmul = pc["active"] - m.vocab * m.hidden  # the embedding is a lookup
    attn = 2.0 * (seq_len + 1) / 2 * m.heads * (m.qk_nope + m.qk_rope + m.v_head) * m.layers
    mtp_unit = 0.0
    if m.mtp_layers:
        per_layer = (pc["active"] - m.vocab * m.hidden * (1 if m.tie_embeddings else 2)) / m.layers
        mtp_unit = m.mtp_layers * (per_layer + 2 * m.hidden * m.hidden + m.vocab * m.hidden)
        attn *= (m.layers + m.mtp_layers) / m.layers
    return 6.0 * (matmul + mtp_unit) + 3.0 * attn


def ramp_seconds(step_s: float, per_seq_s: float, setup: Setup, tokens: float) -> float:
    """Wall seconds for `tokens` training tokens when the batch ramps linearly (in tokens) from
    setup.batch_ramp_start to setup.global_batch over setup.batch_ramp_tokens, then stays.

    A step of B sequences takes fixed + per_seq_s * B, fixed = the step's bubble, ZeRO-1 sync and optimizer
    (step_s - per_seq_s * global_batch), so a token costs fixed / (B * seq) + per_seq_s / seq: smaller batches
    pay the fixed part over fewer tokens. Closed form of the integral over the linear ramp. Below the batch
    the layout accepts (e.g. fewer than 2*pp DualPipe micro-batches) the same line is extended: what the real
    run did there is not published."""
    S, B1 = setup.seq_len, setup.global_batch
    B0, R = min(setup.batch_ramp_start, B1), setup.batch_ramp_tokens
    fixed = max(0.0, step_s - per_seq_s * B1)
    inv_b = tokens / B1  # integral of dx / B(x) over the tokens
    if R > 0 and B0 < B1:
        x = min(tokens, R)
        b_x = B0 + (B1 - B0) * x / R
        inv_b = R / (B1 - B0) * math.log(b_x / B0) + max(0.0, tokens - R) / B1
    return per_seq_s * tokens / S + fixed * inv_b / S


# ------------------------------------------------------------------------------------------ evaluation

class Planner:
    def __init__(self, model: ModelSpec, gpu: GPU, nodes: int, gpus_per_node: int, setup: Setup | None = None,
                 tokens: float = 1e12) -> None:
        if nodes < 1 or gpus_per_node < 1:
            raise ValueError(f"need nodes >= 1 and gpus-per-node >= 1, got {nodes} x {gpus_per_node}")
        self.m, self.gpu = model, gpu
        self.nodes, self.G = nodes, gpus_per_node
        self.world = nodes * gpus_per_node
        base = setup or Setup()
        self.s = Setup(**{**asdict(base), "gpus_per_node": gpus_per_node})
        self.tokens = tokens
        self.cm = CostModel(model, gpu, self.s)
        self._units: dict = {}

    def check(self, lay: Candidate) -> str | None:
        """Why `lay` cannot run (None when it can)."""
        m, G = self.m, self.G
        if min(lay.tp, lay.pp, lay.ep, lay.dp, lay.mbs) < 1:
            return "tp, pp, ep, dp and mbs must all be >= 1"
        if lay.tp * lay.pp * lay.dp != self.world:
            return f"tp*pp*dp = {lay.tp * lay.pp * lay.dp} != {self.world} GPUs"
        if lay.tp > G or G % lay.tp:
            return f"tp={lay.tp} must divide the {G} GPUs of a node"
        if m.heads % lay.tp:
            return f"tp={lay.tp} must divide the {m.heads} attention heads"
        if (lay.dp * lay.tp) % lay.ep:
            return f"ep={lay.ep} must divide dp*tp = {lay.dp * lay.tp}"
        if m.moe_layers and m.n_routed % lay.ep:
            return f"ep={lay.ep} must divide the {m.n_routed} routed experts"
        if lay.ep > G and lay.ep % G:
            return f"ep={lay.ep} spanning nodes must be a multiple of {G} GPUs per node"
        if lay.schedule not in SIM_KINDS:
            return f"schedule {lay.schedule!r} unknown; valid: {', '.join(SIM_KINDS)}"
        if lay.recompute not in RECOMPUTE:
            return f"recompute {lay.recompute!r} unknown; valid: {', '.join(RECOMPUTE)}"
        n_stages = 2 * lay.pp if lay.schedule == "dualpipev" else lay.pp
        if n_stages > m.layers:
            return f"{n_stages} stages for {m.layers} layers"
        if self.s.global_batch % (lay.dp * lay.mbs):
            return f"global batch {self.s.global_batch} not divisible by dp*micro-batch = {lay.dp * lay.mbs}"
        mb = self.s.global_batch // (lay.dp * lay.mbs)
        if lay.pp > 1 and not valid_chunks(lay.schedule, lay.pp, mb):
            return f"{lay.schedule} with pp={lay.pp} cannot run {mb} micro-batches"
        if lay.pp == 1 and lay.schedule != "1f1b":
            return "pp=1 runs no pipeline schedule (use 1f1b)"
        return None

    def _par(self, lay: Candidate) -> Par:
        return Par(tp=lay.tp, ep=lay.ep, mbs=lay.mbs, recompute=lay.recompute,
                   overlap=lay.schedule in OVERLAP_KINDS)

    def _unit_rows(self, par: Par):
        if par not in self._units:
            units = self.cm.units(par)
            U = unit_matrix(units)
            n = self.m.layers
            w = [visit_weight(r, par.overlap) for r in U]
            ep_bytes = max((u.detail.get("ep_bytes_per_token", 0.0) for u in units), default=0.0)
            self._units[par] = (U, w[0], sum(w[1 + n:]), sum(w[1:1 + n]) / max(1, n), ep_bytes)
        return self._units[par]

    def _stages(self, lay: Candidate):
        par = self._par(lay)
        U, first, last, layer_w, _ = self._unit_rows(par)
        if self.s.recipe == "moerun":  # moerun splits layers its own way (parallel.pipeline.layer_split)
            n_stages = 2 * lay.pp if lay.schedule == "dualpipev" else lay.pp
            counts = [len(r) for r in layer_split(self.m.layers, n_stages)]
        else:
            counts = partition(first, last, layer_w, self.m.layers, lay.schedule, lay.pp)
        S = stage_matrix(U, counts)
        held = np.array(rank_stages(lay.schedule, lay.pp))
        return par, counts, S, held

    def memory(self, lay: Candidate, S: np.ndarray, held: np.ndarray, peak_acts: int,
               exact: bool = False) -> tuple[float, dict]:
        """GB on the most loaded GPU and its parts (bytes); `exact`: see _moerun_rank."""
        if self.s.recipe == "moerun":
            ranks = [self._moerun_rank(lay, S, held, r, exact) for r in range(lay.pp)]
            worst = max(ranks, key=lambda d: d["total"])
            return worst["total"] / 1e9, {k: v for k, v in worst.items() if k != "total"}
        edp = max(1, lay.dp * lay.tp // lay.ep)
        pd = S[held, PD].sum(axis=1)
        pe = S[held, PE].sum(axis=1)
        parts = {
            "weights": (pd + pe) * W_BYTES,
            "gradients": (pd + pe) * G_BYTES,
            "optimizer": pd * OPT_BYTES / lay.dp + pe * OPT_BYTES / edp,
            # in-flight sets are spread over the rank's stages: their mean activation per set
            "activations": peak_acts * S[held, ACT].mean(axis=1),
            "transient": S[held, TR].max(axis=1),
            "reserve": np.full(len(held), self.s.reserve_gb * 1e9),
        }
        tot = sum(parts.values())
        r = int(np.argmax(tot))
        return float(tot[r]) / 1e9, {k: float(v[r]) for k, v in parts.items()}

    def rank_memory(self, lay: Candidate, pp_rank: int) -> dict[str, float]:
        """Bytes of pipeline rank `pp_rank` under `lay` ("moerun" recipe: weights, gradients, optimizer,
        activations, transient and reserve at its peak; peak_forward_backward, peak_optimizer_step, total)."""
        if self.s.recipe != "moerun":
            raise ValueError("rank_memory needs the moerun recipe (the v3 recipe models the most loaded rank)")
        why = self.check(lay)
        if why:
            raise ValueError(f"layout {lay.label()}: {why}")
        _, _, S, held = self._stages(lay)
        return self._moerun_rank(lay, S, held, pp_rank, exact=True)

    def _moerun_rank(self, lay: Candidate, S: np.ndarray, held: np.ndarray, pp_rank: int,
                     exact: bool = False) -> dict[str, float]:
        """`exact`: walk every micro-batch of the step; else (the search's memory prune) at most 2pp + 6 of
        them, past the warm-up, with the sends of the rest added (they stay to the step's end)."""
        mb = self.s.global_batch // (lay.dp * lay.mbs)
        chunks = mb if exact or lay.pp == 1 else min(mb, max(min_chunks(lay.schedule, lay.pp), 2 * lay.pp) + 6)
        chunks += chunks % 2 if lay.schedule == "dualpipe" else 0
        n = len(S)
        T, b = lay.mbs * self.s.seq_len, self.s.dtype_bytes
        carry = self.m.mtp_layers > 0 and n > 1
        act = {s: S[s, ACT] + T * rm.stage_boundary(self.m, b, s == 0, s == n - 1, carry) for s in range(n)}
        stages = sorted(set(int(x) for x in held[pp_rank]))
        counts = self._stages(lay)[1]
        first_layer = [sum(counts[:s]) for s in range(n)]
        recv = T * rm.receive_buffers(self.m, b, carry) if lay.pp > 1 else 0.0
        transient = {}
        for s in range(n):
            kinds = {i >= self.m.dense_layers for i in range(first_layer[s], first_layer[s] + counts[s])}
            bwd = max((rm.backward_transient(self.m, b, moe, lay.tp) for moe in kinds), default=0.0)
            transient[s] = max(S[s, TR], T * bwd) + recv
        actions = rank_actions(lay.schedule, lay.pp, chunks, pp_rank)
        sent = T * (2 if carry else 1) * b * self.m.hidden
        out = rank_peak(stages, act, transient, {s: S[s, PD] for s in range(n)},
                        {s: S[s, PE] for s in range(n)}, b, lay.dp, max(1, lay.dp * lay.tp // lay.ep), actions, sent)
        if chunks < mb:  # the sends of the micro-batches not walked
            more = sum(a.kind == SEND for a in actions) * (mb - chunks) / chunks * sent
            out["activations"] += more
            out["peak_forward_backward"] += more
            out["peak"] = max(out["peak_forward_backward"], out["peak_optimizer_step"])
        out["reserve"] = self.s.reserve_gb * 1e9
        out["total"] = out["peak"] + out["reserve"]
        return {k: float(v) for k, v in out.items()}

    def _sync(self, lay: Candidate, S: np.ndarray, held: np.ndarray) -> tuple[float, float]:
        """ZeRO-1 step end: gradient reduce-scatter (FP32) + parameter all-gather (BF16) over the data-parallel
        copies (DualPipe's mirrored stage copies join the group), and the AdamW update on this GPU's shard."""
        mirror = 2 if lay.schedule == "dualpipe" else 1
        edp = max(1, lay.dp * lay.tp // lay.ep)
        ib, nvl = self.gpu.ib_gbps * 1e9, self.gpu.nvlink_gbps * 1e9
        pd = float(S[held, PD].sum(axis=1).max())
        pe = float(S[held, PE].sum(axis=1).max())
        if self.gpu.measured is not None:
            return self._sync_measured(lay, pd, pe, edp)
        sync = 0.0
        for p, n, stride in ((pd, lay.dp * mirror, lay.tp), (pe, edp * mirror, lay.ep)):
            if n > 1 and p > 0:
                bw = ib if (mirror > 1 or stride * n > self.G) else nvl
                sync += p * (G_BYTES + W_BYTES) * (n - 1) / n / bw
        shard = pd / (lay.dp * mirror) + pe / (edp * mirror)
        opt = shard * 24.0 / (self.gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)  # read/write master, moments, grad
        return sync, opt

    def _sync_measured(self, lay: Candidate, pd: float, pe: float, edp: int) -> tuple[float, float]:
        """moerun's step end on a measured machine: an all-reduce per gradient tensor over dp (experts over
        edp), the gradient norm's all-reduce and the all-gather of the fp32 master weights into the
        parameters; the AdamW update is the step-end overhead (Setup.overhead_step_s: its ops and bytes)."""
        mp, b = self.gpu.measured, self.s.dtype_bytes
        layers = max(self._stages(lay)[1]) * (2 if lay.schedule in OVERLAP_KINDS else 1)
        sync = mp.link("all_reduce", self.world).latency_s if self.world > 1 else 0.0
        for p, n, tensors in ((pd, lay.dp, layers * rm.DENSE_TENSORS_PER_LAYER), (pe, edp, layers * 3)):
            if n > 1 and p > 0:
                sync += mp.link("all_reduce", n).seconds(p * b, calls=tensors) + mp.link("all_gather", n).seconds(4 * p)
        if lay.tp > 1:  # replicated weights that saw a part of the heads (MLA's latent down-projections and
            m = self.m  # their norms) get their gradients summed over TP
            part = m.hidden * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope) + m.q_lora_rank + m.kv_lora_rank
            sync += mp.link("all_reduce", lay.tp).seconds(layers * part * b, calls=layers * 4)
        opt = self.s.overhead_step_s  # the update's ops and memory traffic, counted from the code (a dry run)
        return sync, opt

    def sim_costs(self, lay: Candidate, S: np.ndarray, held: np.ndarray) -> dict:
        """The simulator's per-action costs (seconds): the per-stage-visit average of the bottleneck rank."""
        avg = S[held, TIME].mean(axis=1)           # ranks x time fields
        wt = [visit_weight(row, lay.schedule in OVERLAP_KINDS) for row in avg]
        a = avg[int(np.argmax(wt))]
        act = self.s.seq_len * lay.mbs * 2 * self.m.hidden / lay.tp
        bw = self.gpu.ib_gbps if lay.dp * lay.tp >= self.G else self.gpu.nvlink_gbps
        comm = act / (bw * 1e9) + P2P_LATENCY_S if lay.pp > 1 else 0.0
        if self.gpu.measured is not None and lay.pp > 1:  # moerun sends [hidden | embeddings] with MTP
            width = (2 if self.m.mtp_layers else 1) * self.s.dtype_bytes * self.m.hidden / lay.tp
            comm = self.gpu.measured.link("p2p", 2).seconds(self.s.seq_len * lay.mbs * width)
        of, ob = self.s.overhead_f_s, self.s.overhead_b_s
        d = {"f": a[F_] + a[TF] + of, "b": a[B_] + a[TB] + ob, "w": min(a[W_], a[B_]), "a2a_f": a[AF],
             "a2a_b": a[AB], "comm": comm if lay.pp > 1 else 0.0}
        if lay.schedule in OVERLAP_KINDS:  # F&B: each chunk's all-to-all runs behind the other's compute
            d["fb"] = max(a[F_] + a[B_], a[AF] + a[AB]) + a[TF] + a[TB] + of + ob
        return {k: float(v) for k, v in d.items()}

    def lower_bound(self, lay: Candidate, S: np.ndarray, held: np.ndarray) -> float:
        """Step time bound used to prune: every micro-batch's work on the bottleneck rank, the DualPipe README
        bubble of the schedule computed with compute-only costs, and the step-end sync."""
        c = self.sim_costs(lay, S, held)
        mb = self.s.global_batch // (lay.dp * lay.mbs)
        f, b, w = c["f"], c["b"], c["w"]
        if lay.pp == 1:
            bubble = 0.0
        elif lay.schedule == "1f1b":
            bubble = (lay.pp - 1) * (f + b)
        elif lay.schedule == "zb1p":
            bubble = (lay.pp - 1) * max(0.0, f + b - 2 * w)
        else:
            half = lay.pp / 2 - 1 if lay.schedule == "dualpipe" else lay.pp - 1
            bubble = max(0.0, half) * max(0.0, c["fb"] + b - 3 * w)
        return mb * c.get("fb", f + b + c["a2a_f"] + c["a2a_b"]) + bubble + sum(self._sync(lay, S, held))

    def evaluate(self, lay: Candidate, stages_info=None) -> Evaluation:
        why = self.check(lay)
        if why:
            raise ValueError(f"layout {lay.label()}: {why}")
        par, counts, S, held = stages_info or self._stages(lay)
        mb = self.s.global_batch // (lay.dp * lay.mbs)
        c = self.sim_costs(lay, S, held)
        if lay.pp == 1:
            makespan, bubble, peak, sims = mb * (c["f"] + c["b"] + c["a2a_f"] + c["a2a_b"]), 0.0, 1, ()
            per_seq = makespan / mb / (lay.dp * lay.mbs)
        else:
            try:
                pr = pipeline_time(lay.schedule, lay.pp, mb, c["f"], c["b"], c["w"], c.get("fb"), c["comm"],
                                   c["a2a_f"], c["a2a_b"])
            except PipelineError as e:
                raise ValueError(f"layout {lay.label()}: {e}") from None
            makespan, bubble, peak, sims = pr.makespan, pr.bubble, pr.peak_activations, pr.simulated_chunks
        per_seq = self._per_sequence(lay, mb, c, makespan)
        mem_gb, mem = self.memory(lay, S, held, peak, exact=True)
        sync, opt = self._sync(lay, S, held)
        return Evaluation(
            layout=lay, microbatches=mb, fits=mem_gb <= self.gpu.hbm_gb, memory_gb=mem_gb, memory=mem,
            step_time_s=makespan + sync + opt, makespan_s=makespan,
            bubble_fraction=bubble / makespan if makespan else 0.0, dp_sync_s=sync, optimizer_s=opt,
            stage_layers=counts, costs=c, ep_bytes_per_token=self._unit_rows(par)[4], simulated_chunks=sims,
            per_sequence_s=per_seq)

    def _per_sequence(self, lay: Candidate, mb: int, c: dict, makespan: float) -> float:
        """Makespan added per sequence of the global batch: the schedule's steady-state slope, from the
        simulator at mb + 2 micro-batches (valid for every schedule when mb is)."""
        pr = pipeline_time(lay.schedule, lay.pp, mb + 2, c["f"], c["b"], c["w"], c.get("fb"), c["comm"],
                           c["a2a_f"], c["a2a_b"])
        return max(0.0, pr.makespan - makespan) / 2 / (lay.dp * lay.mbs)

    # -------------------------------------------------------------------------------------- search
    def candidates(self, fixed: dict | None = None) -> list[Candidate]:
        """tp in {1,2,4,8}, pp in {1,2,4,...,32} (or the fixed values), every ep dividing dp*tp (check() then
        keeps those dividing the experts), and all schedules, micro-batch sizes and recompute policies."""
        fixed = fixed or {}
        W, G = self.world, self.G
        out = []
        for tp in ([fixed["tp"]] if "tp" in fixed else [1, 2, 4, 8]):
            if tp < 1 or tp > G or W % tp:
                continue
            for pp in ([fixed["pp"]] if "pp" in fixed else [1, 2, 4, 8, 16, 32]):
                if pp < 1 or (W // tp) % pp:
                    continue
                dp = W // (tp * pp)
                eps = [e for e in range(1, dp * tp + 1) if (dp * tp) % e == 0]
                for ep in eps:
                    for sched in (("1f1b",) if pp == 1 else SIM_KINDS):
                        for mbs in (1, 2, 4):
                            for rc in (("none",) if self.s.recipe == "moerun" else RECOMPUTE):
                                lay = Candidate(tp, pp, ep, dp, sched, mbs, rc)
                                if any(getattr(lay, k) != v for k, v in fixed.items()):
                                    continue
                                if self.check(lay) is None:
                                    out.append(lay)
        return out

    def search(self, fixed: dict | None = None, top: int = 10, include_unfit: bool = False) -> dict:
        t0 = time.perf_counter()
        cands = self.candidates(fixed)
        peaks: dict = {}
        staged = []
        n_fit = 0
        for lay in cands:
            info = self._stages(lay)
            pk = self._peak_guess(lay, peaks)
            mem_gb, _ = self.memory(lay, info[2], info[3], pk)
            fits = mem_gb <= self.gpu.hbm_gb
            n_fit += fits
            if fits or include_unfit:
                staged.append((self.lower_bound(lay, info[2], info[3]), lay, info))
        # dominance: of the same layout with different recompute, the one recomputing least that fits is
        # never slower; drop the others before simulating
        order = {rc: i for i, rc in enumerate(("none", "selective", "full"))}
        keep: dict = {}
        for item in staged:
            lay = item[1]
            key = (lay.tp, lay.pp, lay.ep, lay.dp, lay.schedule, lay.mbs)
            if key not in keep or order[lay.recompute] < order[keep[key][1].recompute]:
                keep[key] = item
        if not include_unfit:
            staged = list(keep.values())
        staged.sort(key=lambda x: x[0])
        best: list[Evaluation] = []
        for lb, lay, info in staged:
            if len(best) >= top and lb > best[top - 1].step_time_s:
                break
            ev = self.evaluate(lay, info)
            if not ev.fits and not include_unfit:
                continue
            best.append(ev)
            best.sort(key=lambda e: (not e.fits, e.step_time_s))
            best = best[:max(top, 1)]
        return {"evaluations": best, "candidates": len(cands), "fit_memory": n_fit,
                "elapsed_s": time.perf_counter() - t0}

    def _peak_guess(self, lay: Candidate, cache: dict) -> int:
        """Peak in-flight micro-batches for the memory prune: the simulator's count at the minimum chunks."""
        if lay.pp == 1:
            return 1
        key = (lay.schedule, lay.pp)
        if key not in cache:
            m1 = 2 * lay.pp
            cache[key] = pipeline_time(lay.schedule, lay.pp, m1, 1.0, 2.0, 1.0, 2.0, 0.0).peak_activations
        return cache[key]


def parse_layout(text: str) -> dict:
    """`pp=16,ep=64,tp=1[,dp=..,schedule=dualpipe,mbs=1,recompute=selective]` -> fixed fields."""
    keys = {"tp": int, "pp": int, "ep": int, "dp": int, "schedule": str, "mbs": int, "recompute": str}
    alias = {"mb": "mbs", "micro_batch": "mbs", "sched": "schedule"}
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--layout item {part!r} is not key=value (keys: {', '.join(keys)})")
        k, v = (x.strip() for x in part.split("=", 1))
        k = alias.get(k, k)
        if k not in keys:
            raise ValueError(f"--layout key {k!r} unknown; valid: {', '.join(keys)}")
        try:
            out[k] = keys[k](v)
        except ValueError:
            raise ValueError(f"--layout {k}={v!r}: expected {keys[k].__name__}") from None
    return out
