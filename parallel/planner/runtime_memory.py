"""What moerun's own training code keeps per token until the backward (the planner's `recipe="moerun"`).

Bytes per token of one micro-batch, unit by unit, read off the code op by op: the tensors autograd saves
(runtime/model/deepseek.py, ops/norm.py, ops/mla.py, ops/moe.py, parallel/expert.py), with the model's
dtype of `b` bytes for weights, activations and gradients. Nothing is recomputed, so every forward keeps
all of it until its backward. `moerun dryrun` measures the same thing by running the code under fake
tensors; tests/test_dryrun.py holds the two within 10% of each other.

Per op (b = dtype bytes, h = hidden):
- RMSNorm (computed in fp32, cast back): the fp32 copy of its input, the normalised output before the
  gain (b), and the fp32 reciprocal rms: (4 + b) d + 4 for width d. (In fp32 the "copy" is the input.)
- a linear layer: its input (shared by the layers reading the same tensor).
- MLA: input norm; the normed input (q_a and kv_a read it); q_a norm and its output (q_b reads it); the kv
  latent norm and its output (kv_b reads it); flash attention's q, k, v (v padded to the q/k head dim, so
  the fused kernel runs: ops/mla.py) and output, all H (dn + dr) wide, plus its fp32 log-sum-exp per head;
  the o_proj input (H dv).
- dense MLP / shared experts (SwiGLU): the input, gate and up outputs, silu(gate), the product (4 x width).
- router: an fp32 copy of the input (F.linear in fp32), fp32 scores, the candidate mask, the top-k ids and
  weights, the group scores and ids, the weights' normaliser.
- dispatch: the k rows per token gathered for the experts (h wide) and two index vectors of the k pairs.
- routed experts (grouped GEMM): their input rows, gate and up outputs, silu, the product (4 x moe width per
  row), the output rows (weighted by the routing weights, which are kept too).
- the head: the final norm, the head's input, and the fp32 log-softmax of the cross-entropy (V wide).
- MTP module: its two input norms, the concatenation (2h, the projection's input), a decoder layer, its own
  final norm, and the head again.
- A pipeline stage also keeps the activation it received until its backward, and every activation and
  gradient it sends until the step's end (stage_boundary; rank_memory.py).
Transients (alive only while a stage computes): the head's logits and their fp32 copy; one layer's backward
gradient temporaries; the receive buffers the pipeline posts ahead of the compute that reads them.
"""

from __future__ import annotations

from .models import ModelSpec

DENSE_TENSORS_PER_LAYER = 13  # MLA's 5 projections + 2 latent norms, 2 layer norms, 3 MLP weights, the router


def norm(d: float, b: int) -> float:
    return (4 + b) * d + 4


def attention(m: ModelSpec, b: int, tp: int = 1) -> float:
    heads = m.heads / tp
    qk = m.qk_nope + m.qk_rope
    out = norm(m.hidden, b) + b * m.hidden                       # input norm; its output (q_a / kv_a read it)
    if m.q_lora_rank:
        out += norm(m.q_lora_rank, b) + b * m.q_lora_rank        # q latent norm; its output (q_b reads it)
    out += norm(m.kv_lora_rank, b) + b * m.kv_lora_rank          # kv latent norm; its output (kv_b reads it)
    out += 4 * b * heads * qk + 4 * heads                        # flash attention: q, k, v (padded), out; lse
    out += b * heads * m.v_head                                  # o_proj input
    return out


def swiglu_mlp(width: float, b: int) -> float:
    """A SwiGLU MLP's saved tensors beyond its input: gate and up outputs, silu(gate), the product."""
    return 4 * b * width


def dense_layer(m: ModelSpec, b: int, tp: int = 1) -> float:
    return attention(m, b, tp) + norm(m.hidden, b) + b * m.hidden + swiglu_mlp(m.intermediate / tp, b)


def router(m: ModelSpec) -> float:
    groups = 16 * m.n_group + 8 * m.topk_group if m.n_group > 1 else 0
    return 4 * m.hidden + 4 * m.n_routed + m.n_routed + 12 * m.topk + groups + 4


def moe_layer(m: ModelSpec, b: int, tp: int = 1) -> float:
    k, h = m.topk, m.hidden
    out = attention(m, b, tp) + norm(h, b) + router(m)
    out += b * h * k + 16 * k                                    # dispatched rows, pair indices
    out += b * h * k + swiglu_mlp(m.moe_intermediate, b) * k + b * h * k + b * k  # experts, weights
    if m.n_shared:
        out += (b * h if b != 4 else 0) + swiglu_mlp(m.n_shared * m.moe_intermediate / tp, b)  # fp32: shared
    return out                                                   # input = the router's copy


def layer(m: ModelSpec, moe: bool, b: int, tp: int = 1) -> float:
    return moe_layer(m, b, tp) if moe else dense_layer(m, b, tp)


def head(m: ModelSpec, b: int) -> float:
    """Final norm, head input, fp32 log-softmax over the whole vocabulary (gathered under TP)."""
    return norm(m.hidden, b) + b * m.hidden + 4 * m.vocab


def mtp(m: ModelSpec, b: int, tp: int = 1) -> float:
    h = m.hidden
    return 2 * norm(h, b) + 2 * b * h + layer(m, m.moe_layers > 0, b, tp) + norm(h, b) + b * h + 4 * m.vocab


def embedding() -> float:
    return 8.0  # the token ids (int64) the embedding's backward reads


def receive_buffers(m: ModelSpec, b: int, carry: bool) -> float:
    """The activation and gradient receives a pipeline rank posts ahead of use (two buffers per token)."""
    return 2 * (2 if carry else 1) * b * m.hidden


def stage_boundary(m: ModelSpec, b: int, first: bool, last: bool, carry: bool) -> float:
    """What the pipeline executor holds per token of an in-flight micro-batch beside autograd: the activation
    it received (not on the first stage; [hidden | embeddings] wide when the embeddings travel to the MTP
    modules), and with that carry the stage's own output (the message sent is a new concatenation) and, on
    the first stage, the embeddings it sent along. (Without carry the output is the message itself, which
    stays until the step's end: counted with the sends, rank_memory.py.)"""
    width = (2 if carry else 1) * b * m.hidden
    return (0.0 if first else width) + (b * m.hidden if carry and not last else 0.0) + \
        (b * m.hidden if carry and first else 0.0)


def logits_transient(m: ModelSpec, b: int) -> float:
    """Bytes per token alive at once while the loss is formed beside the kept log-softmax: the head's
    logits (b) and their fp32 copy."""
    return (b + 4) * m.vocab


def backward_transient(m: ModelSpec, b: int, moe: bool, tp: int = 1) -> float:
    """Bytes per token of gradient temporaries alive at once inside one layer's backward, at its largest: in
    a MoE layer the gradients of the k expert output rows per token before and after their routing weights
    and the rows' gradient buffer (3 b h k); in a dense layer those of the gate and up outputs and of their
    product (3 b I)."""
    return 3 * b * m.hidden * m.topk if moe else 3 * b * m.intermediate / tp
