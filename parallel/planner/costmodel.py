"""Cost model of one micro-batch through one model unit (embedding, a decoder layer, an MTP module, the head).

Per unit and per GPU it gives compute time of the forward (F), the full backward (B, including recompute)
and its weight-gradient part (W); the expert-parallel all-to-all time of F and of B (dispatch + combine,
FP8 dispatch and BF16 combine, node-limited routing bounding the InfiniBand copies per token); tensor-parallel
collectives; parameters held; activation bytes kept until the backward; and model FLOPs (for MFU).

Compute time is FLOPs / achievable TFLOPS of the kernel that runs it (hardware.py: FP8 figures per GEMM shape
from DeepGEMM's README, or those of its CUTLASS 3.6-based baseline before DeepGEMM's release (Setup.kernels_of),
FlashAttention-3 for the attention core, a BF16 efficiency for BF16 GEMMs) scaled by the share of SMs left to
compute (DualPipe-style overlap gives 20 of 132 SMs to communication), plus memory-bound
element-wise work (norms, SwiGLU, FP8 casts, residual adds, rope) as bytes / achievable HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import runtime_memory as rm
from .hardware import (
    ATTENTION_EFFICIENCY,
    COMM_SMS,
    GPU,
    HBM_EFFICIENCY,
    bf16_gemm_tflops,
    ep_bandwidth_gbps,
    fp8_gemm_tflops,
)
from .models import ModelSpec
from .setup import PRECISIONS, RECIPES, RECOMPUTE, Setup

__all__ = ["PRECISIONS", "RECIPES", "RECOMPUTE", "CostModel", "Par", "Setup", "UnitCost", "param_counts"]


@dataclass
class UnitCost:
    """One unit, one micro-batch, one GPU. Times in seconds, memory in bytes."""

    name: str
    f: float = 0.0        # forward compute
    b: float = 0.0        # full backward compute (input + weight gradients + recompute)
    w: float = 0.0        # weight-gradient part of b
    a2a_f: float = 0.0    # EP dispatch + combine of the forward (hidden only inside an overlapped F&B)
    a2a_b: float = 0.0    # EP all-to-all of the backward
    tp_f: float = 0.0     # TP collectives of the forward (never hidden in this model)
    tp_b: float = 0.0
    params_dense: float = 0.0    # parameters on this GPU, replicated across dp
    params_expert: float = 0.0   # routed-expert parameters on this GPU, replicated across dp*tp/ep
    act_bytes: float = 0.0       # kept from forward to backward
    transient_bytes: float = 0.0  # largest temporary (logits of the loss)
    model_flops: float = 0.0     # 6N-style FLOPs of F+B without recompute, this GPU's share
    detail: dict = field(default_factory=dict)

    def add(self, other: UnitCost) -> None:
        for k in ("f", "b", "w", "a2a_f", "a2a_b", "tp_f", "tp_b", "params_dense", "params_expert",
                  "act_bytes", "model_flops"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.transient_bytes = max(self.transient_bytes, other.transient_bytes)


@dataclass(frozen=True)
class Par:
    """The parallel sizes a unit's cost depends on."""

    tp: int = 1
    ep: int = 1
    mbs: int = 1           # sequences per micro-batch
    recompute: str = "selective"
    overlap: bool = True   # DualPipe-style F&B overlap: compute runs on the SMs not doing communication


# ---------------------------------------------------------------------------------------------- counts

def attention_params(m: ModelSpec) -> int:
    h, H = m.hidden, m.heads
    qk = m.qk_nope + m.qk_rope
    p = h * (m.kv_lora_rank + m.qk_rope) + m.kv_lora_rank  # kv_a (+ its norm)
    p += m.kv_lora_rank * H * (m.qk_nope + m.v_head)       # kv_b
    p += H * m.v_head * h                                  # o
    if m.q_lora_rank:
        p += h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * qk
    else:
        p += h * H * qk
    return p + 2 * h  # two RMSNorm weights of the layer


def expert_params(m: ModelSpec, width: int) -> int:
    return 3 * m.hidden * width


def param_counts(m: ModelSpec) -> dict[str, float]:
    """Total and activated parameters (main model; MTP modules reported apart)."""
    attn = attention_params(m)
    dense_layer = attn + expert_params(m, m.intermediate)
    moe_layer = attn + m.n_routed * expert_params(m, m.moe_intermediate) + \
        m.n_shared * expert_params(m, m.moe_intermediate) + m.n_routed * m.hidden
    moe_active = attn + (m.topk + m.n_shared) * expert_params(m, m.moe_intermediate) + m.n_routed * m.hidden
    emb = m.vocab * m.hidden
    head = 0 if m.tie_embeddings else m.vocab * m.hidden
    total = m.dense_layers * dense_layer + m.moe_layers * moe_layer + emb + head + m.hidden
    active = m.dense_layers * dense_layer + m.moe_layers * moe_active + emb + head + m.hidden
    mtp_layer = moe_layer if m.moe_layers else dense_layer
    mtp = m.mtp_layers * (mtp_layer + 2 * m.hidden * m.hidden + 3 * m.hidden)
    return {"total": total, "active": active, "mtp": mtp}


# ------------------------------------------------------------------------------------------ the model

class CostModel:
    """Unit costs of a model on a GPU for one training setup; cached per (unit kind, Par)."""

    def __init__(self, model: ModelSpec, gpu: GPU, setup: Setup | None = None) -> None:
        self.m = model
        self.gpu = gpu
        self.s = setup or Setup()
        self._cache: dict = {}

    # -- kernels
    def _sm(self, par: Par) -> float:
        if self.gpu.measured is not None:  # a measured machine: no SMs set aside
            return 1.0
        return (self.gpu.sms - COMM_SMS) / self.gpu.sms if par.overlap else 1.0

    def _gemm(self, tokens: float, n: int, k: int, par: Par, grouped: bool = False, bf16: bool = False) -> float:
        """Seconds of one forward GEMM (tokens x k) @ (k x n); dgrad and wgrad take the same each."""
        if tokens <= 0:
            return 0.0
        if self.gpu.measured is not None:
            return self.gpu.measured.gemm_s(tokens, n, k, self._dtype(), grouped)
        if bf16 or self.s.precision == "bf16":
            tf = bf16_gemm_tflops(self.gpu, tokens, n, k)
        else:
            tf = fp8_gemm_tflops(self.gpu, tokens, n, k, grouped=grouped, kernels=self.s.kernels["fp8_gemm"])
        return 2.0 * tokens * n * k / (tf * 1e12 * self._sm(par))

    def _fdw(self, tokens: float, n: int, k: int, par: Par, grouped: bool = False,
             bf16: bool = False) -> tuple[float, float, float]:
        """Seconds of the forward, input-gradient and weight-gradient GEMMs of a (tokens x k) @ (k x n)
        projection, each looked up at its own shape: dgrad is tokens x n -> k, wgrad is n x tokens -> k
        (the MoE weight gradient is K-grouped: looked up as a dense GEMM with K = tokens per expert)."""
        f = self._gemm(tokens, n, k, par, grouped, bf16)
        d = self._gemm(tokens, k, n, par, grouped, bf16)
        w = self._gemm(n, k, int(max(tokens, 1)), par, False, bf16) * tokens / max(tokens, 1)
        return f, d, w

    def _requant(self, tokens: float, n: int, k: int, par: Par) -> float:
        """Backward FP8 re-quantisation: V3's report names it (read, dequantise, transpose, re-quantise into
        128x1 tiles for the weight gradient). Per GEMM: the input activation (k wide) read and written again
        transposed, the output gradient (n wide) read in BF16 and written twice in FP8 (row- and column-wise)."""
        if self.s.precision != "fp8" or tokens <= 0:
            return 0.0
        return self._mem(tokens * (2.0 * k + 4.0 * n), par)

    def _dtype(self) -> str:
        return "float32" if self.s.dtype_bytes == 4 else "bfloat16"

    def _mem(self, nbytes: float, par: Par) -> float:
        if self.gpu.measured is not None:  # counted from the code's own ops instead (Setup.overhead_*)
            return 0.0
        return nbytes / (self.gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)

    def _attn_core(self, tokens: float, par: Par) -> tuple[float, float, float]:
        """(fwd s, bwd s, fwd flops) of causal attention over `tokens` tokens in sequences of seq_len."""
        m, s = self.m, self.s
        ctx = (s.seq_len + 1) / 2.0
        flops = 2.0 * tokens * ctx * (m.heads / par.tp) * (m.qk_nope + m.qk_rope + m.v_head)
        if self.gpu.measured is not None:  # moerun pads v to the q/k head dim for the fused kernel (ops/mla.py)
            qk = m.qk_nope + m.qk_rope
            run = 2.0 * tokens * ctx * (m.heads / par.tp) * (qk + max(qk, m.v_head))
            mp = self.gpu.measured
            return (mp.attention_s(tokens, run, self._dtype()), mp.attention_s(tokens, 2.5 * run, self._dtype(), True),
                    flops)
        peak = self.gpu.bf16_tflops * 1e12 * self._sm(par)
        fwd_eff, bwd_eff = ATTENTION_EFFICIENCY[self.s.kernels["attention"]]
        return flops / (peak * fwd_eff), 2.5 * flops / (peak * bwd_eff), flops

    # -- pieces of a layer
    def _attention(self, T: float, par: Par) -> UnitCost:
        m, h, tp = self.m, self.m.hidden, par.tp
        H = m.heads // tp
        qk = m.qk_nope + m.qk_rope
        u = UnitCost("attention")
        gemms = []  # (tokens, n, k) forward GEMMs on this GPU
        if m.q_lora_rank:
            gemms.append((T / tp, m.q_lora_rank + m.kv_lora_rank + m.qk_rope, h))  # fused down-proj (SP tokens)
            up = [(T, H * qk, m.q_lora_rank), (T, H * (m.qk_nope + m.v_head), m.kv_lora_rank)]
        else:
            gemms.append((T / tp, m.kv_lora_rank + m.qk_rope, h))
            gemms.append((T, H * qk, h))
            up = [(T, H * (m.qk_nope + m.v_head), m.kv_lora_rank)]
        gemms += up
        gemms.append((T, h, H * m.v_head))  # output projection
        fdw = [self._fdw(t, n, k, par) for t, n, k in gemms]
        g_f = sum(x[0] for x in fdw)
        g_d = sum(x[1] for x in fdw)
        g_w = sum(x[2] for x in fdw)
        flops = sum(2.0 * t * n * k for t, n, k in gemms)
        a_f, a_b, a_flops = self._attn_core(T, par)
        # element-wise bytes per token (forward): norms with fused FP8 cast, latent norms, rope, output cast,
        # residual add; the backward moves about twice as much.
        per_tok = 3 * h / tp + 4 * (m.q_lora_rank + m.kv_lora_rank) + 4 * (H + 1) * m.qk_rope + \
            4 * H * qk + 3 * H * m.v_head + 6 * h / tp  # (+ k assembled from k_nope and the shared k_rope)
        mem_f = self._mem(T * per_tok, par)
        u.f = g_f + a_f + mem_f
        recompute = 0.0
        if par.recompute == "selective":  # V3: RMSNorms and MLA up-projections are recomputed in backward
            recompute = sum(self._gemm(t, n, k, par) for t, n, k in up) + self._mem(T * (3 * h / tp), par)
        u.w = g_w
        u.b = g_d + g_w + a_b + 2 * mem_f + recompute + sum(self._requant(t, n, k, par) for t, n, k in gemms)
        u.params_dense = attention_params(m) / tp
        u.model_flops = 3 * (flops + a_flops)
        u.act_bytes = T * self._attn_act_per_token(par)
        if tp > 1:
            u.tp_f = u.tp_b = 2 * self._tp_collective(T, par)  # all-gather in, reduce-scatter out
            if self.gpu.measured is not None:  # moerun: the q and kv latents' gradients are summed over TP
                ar = self.gpu.measured.link("all_reduce", tp)
                u.tp_b += ar.seconds(T * self.s.dtype_bytes * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope),
                                     calls=2 if m.q_lora_rank else 1)
        return u

    def _attn_act_per_token(self, par: Par) -> float:
        m, h, tp = self.m, self.m.hidden, par.tp
        H = m.heads / tp
        qk = m.qk_nope + m.qk_rope
        lat = m.q_lora_rank + m.kv_lora_rank + m.qk_rope
        if par.recompute == "full":
            return 2 * h / tp                        # the layer input only
        if par.recompute == "selective":
            # input (BF16), latents (BF16), attention output cached in FP8 for the o-proj wgrad, softmax stats
            return 2 * h / tp + 2 * lat + H * m.v_head + 4 * H
        # everything a plain BF16 implementation keeps: input, normed input, latents (raw + normed), q, k, v,
        # attention output, softmax stats
        return 4 * h / tp + 4 * lat + 2 * H * (2 * qk + m.v_head) + 2 * H * m.v_head + 4 * H

    def _ffn(self, T: float, width: int, count: float, par: Par, grouped: bool, tp_split: bool) -> tuple:
        """(fwd gemm s, fwd flops, elementwise fwd s) of `count` SwiGLU experts of `width` on T tokens each."""
        h = self.m.hidden
        wd = width / par.tp if tp_split else width
        up, down = self._fdw(T, int(2 * wd), h, par, grouped), self._fdw(T, h, int(wd), par, grouped)
        g = tuple(count * (a + b) for a, b in zip(up, down, strict=True))
        flops = count * 2.0 * T * 3 * h * wd
        mem = self._mem(count * T * 5 * wd, par)  # SwiGLU: read 2w BF16, write w FP8 (+ scales)
        return g, flops, mem

    def _tp_collective(self, T: float, par: Par) -> float:
        tp = par.tp
        if self.gpu.measured is not None:  # moerun: an all-reduce of the block's [T, h] output (or its gradient)
            return self.gpu.measured.link("all_reduce", tp).seconds(T * self.s.dtype_bytes * self.m.hidden) / 2
        return T * 2 * self.m.hidden * (tp - 1) / tp / (self.gpu.nvlink_gbps * 1e9)

    def ep_alltoall(self, T: float, par: Par) -> tuple[float, dict]:
        """Seconds of one dispatch + one combine of T tokens from this GPU, and how it was derived."""
        m, s = self.m, self.s
        if par.ep <= 1 or not m.moe_layers:
            return 0.0, {"ep_bytes_per_token": 0.0}
        if self.gpu.measured is not None:
            return self.gpu.measured.moerun_alltoall(T * s.routed_load, par.ep, m.topk, m.hidden, s.dtype_bytes)
        G = s.gpus_per_node
        bw, internode = ep_bandwidth_gbps(self.gpu, par.ep, G)
        h = m.hidden
        disp = h * (1 + 4 / 128) if s.precision == "fp8" else 2 * h  # FP8 + one fp32 scale per 128
        comb = 2 * h                                                  # combine in BF16
        if internode:
            nodes = max(1, par.ep // G)
            reach = nodes
            if m.n_group > 1 and m.topk_group < m.n_group:  # node-limited routing: <= topk_group groups
                reach = max(1, min(nodes, round(m.topk_group * nodes / m.n_group)))
            touched = reach * (1 - (1 - 1 / reach) ** m.topk)
            copies = touched * (1 - 1 / nodes)  # copies that cross InfiniBand, one per remote node
        else:
            reach = par.ep  # device-limited routing (V2's M=3 at EP8): the groups a token may use are on
            if m.n_group > 1 and m.topk_group < m.n_group:  # at most this many GPUs
                reach = max(1, min(par.ep, round(m.topk_group * max(par.ep, m.n_group) / m.n_group)))
            touched = reach * (1 - (1 - 1 / reach) ** m.topk)
            copies = touched * (1 - 1 / par.ep)  # copies that leave this GPU over NVLink
        per_token = copies * (disp + comb)
        t = T * per_token * s.routed_load / (bw * 1e9)
        return t, {"ep_bytes_per_token": per_token, "ep_copies_per_token": copies, "ep_gbps": bw,
                   "ep_internode": internode}

    # -- units
    def layer(self, moe: bool, par: Par) -> UnitCost:
        key = ("layer", moe, par)
        if key in self._cache:
            return self._cache[key]
        m, h, tp = self.m, self.m.hidden, par.tp
        T = float(par.mbs * self.s.seq_len)
        u = UnitCost("moe" if moe else "dense")
        att = self._attention(T, par)
        u.add(att)
        mem_common = self._mem(T * (3 * h + 6 * h + 4 * h) / tp, par)  # norm + cast, residual add, BF16 copy
        if moe:
            tok_ep = T / tp  # sequence-parallel: each tp rank dispatches its share of the tokens
            if self.s.recipe == "moerun" and par.ep == 1:
                tok_ep = T  # moerun without EP: every TP rank routes all tokens through all experts
            routed_rows = tok_ep * m.topk * self.s.routed_load  # expert rows computed on this GPU
            per_expert = routed_rows * par.ep / m.n_routed
            up = self._fdw(per_expert, 2 * m.moe_intermediate, h, par, True)
            down = self._fdw(per_expert, h, m.moe_intermediate, par, True)
            g_r = tuple((m.n_routed / par.ep) * (a + b) for a, b in zip(up, down, strict=True))
            fl_r = 2.0 * routed_rows * 3 * h * m.moe_intermediate / self.s.routed_load
            # SwiGLU of every routed row, and the permutation of rows to / from the expert-contiguous
            # layout of the grouped GEMM (FP8 in, BF16 out, each read and written once)
            mem_r = self._mem(routed_rows * (5 * m.moe_intermediate + 2 * h + 4 * h), par)
            g_s, fl_s, mem_s = self._ffn(T, m.moe_intermediate, m.n_shared, par, False, True)
            g_gate = self._fdw(tok_ep, m.n_routed, h, par, bf16=True)
            fl_gate = 2.0 * tok_ep * m.n_routed * h
            g = tuple(a + b + c for a, b, c in zip(g_r, g_s, g_gate, strict=True))
            mem = mem_r + mem_s + mem_common + self._mem(tok_ep * 8 * m.n_routed, par)
            requant = self._requant(routed_rows, 2 * m.moe_intermediate, h, par) + \
                self._requant(routed_rows, h, m.moe_intermediate, par) + \
                m.n_shared * (self._requant(T, 2 * m.moe_intermediate / tp, h, par)
                              + self._requant(T, h, m.moe_intermediate / tp, par))
            swiglu_rows = routed_rows * m.moe_intermediate + m.n_shared * T * m.moe_intermediate / tp
            a2a, info = self.ep_alltoall(tok_ep, par)
            u.a2a_f = u.a2a_b = a2a
            u.detail.update(info)
            u.params_dense += (m.n_shared * expert_params(m, m.moe_intermediate) / tp + m.n_routed * h)
            u.params_expert += (m.n_routed / par.ep) * expert_params(m, m.moe_intermediate)
            u.model_flops += 3 * (fl_r + fl_s + fl_gate)
            u.act_bytes += self._moe_act(T, tok_ep, routed_rows, par)
        else:
            g, fl, mem_d = self._ffn(T, m.intermediate, 1, par, False, True)
            mem = mem_d + mem_common
            requant = self._requant(T, 2 * m.intermediate / tp, h, par) + \
                self._requant(T, h, m.intermediate / tp, par)
            swiglu_rows = T * m.intermediate / tp
            u.params_dense += expert_params(m, m.intermediate) / tp
            u.model_flops += 3 * fl
            u.act_bytes += self._dense_act(T, par)
        u.f += g[0] + mem
        u.w += g[2]
        u.b += g[1] + g[2] + 2 * mem + requant
        if par.recompute == "selective":
            # V3 report 3.2.3: "we recompute all RMSNorm operations" (the attention's is in _attention; this
            # is the MLP's: read BF16, write FP8 + scales), and 3.3.3: "we cache the inputs of the SwiGLU
            # operator and recompute its output in the backward pass" (read the FP8 2w input, write FP8 w)
            u.b += self._mem(T * 3 * h / tp + 3 * swiglu_rows, par)
        if tp > 1:
            u.tp_f += 2 * self._tp_collective(T, par)
            u.tp_b += 2 * self._tp_collective(T, par)
        if par.recompute == "full":  # the whole forward again, all-to-all and TP collectives included
            u.b += u.f
            u.a2a_b += u.a2a_f
            u.tp_b += u.tp_f
        self._accumulate(u, u.params_dense + u.params_expert, par)
        if self.s.recipe == "moerun":
            u.act_bytes = T * self._moerun_layer_act(moe, par)
        self._cache[key] = u
        return u

    def _moerun_layer_act(self, moe: bool, par: Par) -> float:
        """Bytes per token moerun keeps for one decoder layer (runtime_memory.py). Under EP the pipeline's
        overlap engine cuts a MoE layer into compute segments at its all-to-alls and keeps two more
        activations per token: the attention block's residual output and the combined expert output, which
        end segments (parallel/pipeline/overlap.py)."""
        b = self.s.dtype_bytes
        extra = 2 * b * self.m.hidden if moe and par.ep > 1 else 0.0
        return rm.layer(self.m, moe, b, par.tp) + extra

    def _accumulate(self, u: UnitCost, params: float, par: Par) -> None:
        """Every micro-batch's weight gradient is added into the FP32 gradient buffer (V3 keeps gradients in
        FP32 for accumulation): read and write 4 bytes per parameter instead of writing a 2-byte output."""
        t = self._mem(params * 6.0, par)
        u.w += t
        u.b += t

    def _moe_act(self, T: float, tok_ep: float, rows: float, par: Par) -> float:
        m, h, mi = self.m, self.m.hidden, self.m.moe_intermediate
        if par.recompute == "full":
            return T * 2 * h / par.tp
        shared_w = m.n_shared * mi / par.tp
        if par.recompute == "selective":
            # input (BF16), FP8 normed input, FP8 received tokens (up-proj wgrad), FP8 SwiGLU inputs
            # (output recomputed), shared expert's FP8 SwiGLU input, routing weights
            return T * (2 * h / par.tp + h / par.tp + 2 * shared_w) + rows * (h + 2 * mi) + tok_ep * 8 * m.topk
        return T * (4 * h / par.tp + 6 * shared_w) + rows * (2 * h + 6 * mi + 2 * h) + tok_ep * 8 * m.n_routed

    def _dense_act(self, T: float, par: Par) -> float:
        h, w = self.m.hidden, self.m.intermediate / par.tp
        if par.recompute == "full":
            return T * 2 * h / par.tp
        if par.recompute == "selective":
            return T * (3 * h / par.tp + 2 * w)
        return T * (4 * h / par.tp + 6 * w)

    def embedding(self, par: Par) -> UnitCost:
        m, T = self.m, float(par.mbs * self.s.seq_len)
        u = UnitCost("embed")
        u.f = self._mem(T * 2 * m.hidden, par)
        u.b = 2 * u.f
        u.params_dense = m.vocab * m.hidden / par.tp
        if self.s.recipe == "moerun":
            u.act_bytes = T * rm.embedding()
        if self.gpu.measured is not None and par.tp > 1:  # vocabulary-split lookup: its output summed over TP
            u.tp_f = u.tp_b = 2 * self._tp_collective(T, par)
        return u

    def head(self, par: Par, shares_weights: bool = False) -> UnitCost:
        """Final norm, output projection (BF16 in V3's recipe) and cross-entropy."""
        m, T = self.m, float(par.mbs * self.s.seq_len)
        V = m.vocab / par.tp
        u = UnitCost("head")
        g = self._fdw(T, int(V), m.hidden, par, bf16=True)
        logits_bytes = T * V * 4.0
        mem = self._mem(T * 3 * m.hidden + 3 * logits_bytes, par)  # norm; softmax / loss over the logits
        u.f, u.w, u.b = g[0] + mem, g[2], g[1] + g[2] + 2 * mem
        u.model_flops = 3 * 2.0 * T * V * m.hidden
        u.params_dense = 0.0 if shares_weights else V * m.hidden
        self._accumulate(u, V * m.hidden, par)  # the MTP head shares the weights but adds its own gradient
        u.act_bytes = T * 2 * m.hidden
        u.transient_bytes = T * V * 6.0  # BF16 logits and their FP32 softmax
        if self.s.recipe == "moerun":
            u.act_bytes = T * rm.head(m, self.s.dtype_bytes)
        if self.gpu.measured is not None and par.tp > 1:  # the logits gathered over TP
            u.tp_f = self.gpu.measured.link("all_gather", par.tp).seconds(T * m.vocab * self.s.dtype_bytes)
            u.transient_bytes = T * rm.logits_transient(m, self.s.dtype_bytes)
        return u

    def mtp(self, par: Par) -> UnitCost:
        """One multi-token-prediction module: two norms, a 2h->h projection, one layer, the shared head."""
        m, T = self.m, float(par.mbs * self.s.seq_len)
        u = UnitCost("mtp")
        g = self._fdw(T, m.hidden, 2 * m.hidden, par, bf16=True)
        u.f, u.w, u.b = g[0], g[2], g[1] + g[2]
        u.params_dense = 2 * m.hidden * m.hidden + 3 * m.hidden
        self._accumulate(u, u.params_dense, par)
        u.model_flops = 3 * 2.0 * T * 2 * m.hidden * m.hidden
        u.add(self.layer(m.moe_layers > 0, par))
        u.add(self.head(par, shares_weights=True))
        u.add(self.embedding(par))
        u.params_dense -= m.vocab * m.hidden / par.tp  # embedding shared with the main model
        u.name = "mtp"
        if self.s.recipe == "moerun":
            moe = m.moe_layers > 0
            u.act_bytes = T * (rm.mtp(m, self.s.dtype_bytes, par.tp) - rm.layer(m, moe, self.s.dtype_bytes, par.tp)
                               + self._moerun_layer_act(moe, par))
        return u

    def units(self, par: Par) -> list[UnitCost]:
        """The model as an ordered list of units: embedding, layers, head, MTP modules (all on the last stage)."""
        key = ("units", par)
        if key not in self._cache:
            m = self.m
            us = [self.embedding(par)]
            us += [self.layer(i >= m.dense_layers, par) for i in range(m.layers)]
            us.append(self.head(par, shares_weights=m.tie_embeddings))
            us += [self.mtp(par) for _ in range(m.mtp_layers)]
            self._cache[key] = us
        return self._cache[key]
