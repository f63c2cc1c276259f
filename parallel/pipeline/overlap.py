"""A pipeline stage's forward and backward as phases, so one micro-batch's all-to-all hides behind another's
compute (DualPipe's overlapped F&B).

A stage's forward is cut at every expert-parallel all-to-all into *compute segments* and *comm nodes*:

    [embed] attention+gate | dispatch | experts | combine (shared experts meanwhile) | residual, next attention ...

Each compute segment runs under autograd on detached copies of its inputs (its "leaves"), so its backward
is one `torch.autograd.backward` that stops at the segment boundary. Comm nodes are not autograd nodes:
their backward is written out (dispatch's backward is a combine-like reverse all-to-all, combine's backward
a dispatch-like one) and is started asynchronously like the forward ones. So forward and backward are both
sequences "compute, start a transfer, (anything), wait for it, compute, ...", written as Python generators
that `yield` right after starting a transfer. `run(gen)` drives one to the end (plain F or B: each transfer
is waited at once and fully exposed); `run_pair(f, b)` alternates two, so while the forward's dispatch
travels the backward computes, and the other way round: each one's all-to-all is in flight while the
other computes. On CPU the transfers progress in gloo's own threads (and the emulated link's clock,
parallel/link.py); on GPU they would need the all-to-alls on a side stream (unverified on hardware).

Layers whose dispatcher is not an expert-parallel one (dense layers, `LocalDispatcher`) are plain compute.
The buffers the comm nodes make for their backward are created on the device of the tokens they carry, so
CPU and CUDA stages run the same code.
The same code path runs for F, B, I/W and FB, so the parity tests of the executor cover it all.

Split backward (zero-bubble I / W, parallel/pipeline/wgrad.py): I computes the gradients of each segment's
leaves only, recording the gradient that reaches every weight's joint with the input path; W starts there
and computes only the weight-gradient side (no input-gradient GEMM runs twice). An FB's backward uses the
same split to run each segment's W right after the next transfer has started, so that transfer hides
behind W as well as behind the other micro-batch's forward (DualPipe's MLP(W) / ATTN(W) placement).
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import expert as ep_ops

from .wgrad import WeightSplit

IGNORE_INDEX = -100
Phases = Generator[None, None, object]


def _diff(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class Segment:
    """Compute on detached leaves: fn(*leaves) -> (outputs, aux scalars). Backward stops at the leaves."""

    def __init__(self, fn: Callable, inputs: tuple, aux_scale: float) -> None:
        track = torch.is_grad_enabled()  # under no_grad (forward-only pipelines) no graph is kept
        self.leaves = tuple(x.detach().requires_grad_(track) if _diff(x) else x for x in inputs)
        outs, aux = fn(*self.leaves)
        self.outs, self.aux, self.aux_scale = tuple(outs), list(aux), aux_scale
        self.deferred: tuple[list, list] | None = None

    def _targets(self, grads: tuple) -> tuple[list, list]:
        outs, gs = [], []
        for o, g in zip(self.outs, grads, strict=True):
            if g is not None and _diff(o) and o.requires_grad:
                outs.append(o)
                gs.append(g)
        for a in self.aux:
            outs.append(a)
            gs.append(torch.full_like(a, self.aux_scale))
        return outs, gs

    def backward(self, grads: tuple, split: bool = False) -> tuple:
        """Gradients of the leaves (None where not differentiable). split=True: parameters later (W)."""
        outs, gs = self._targets(grads)
        result: list = [None] * len(self.leaves)
        if not outs:
            return tuple(result)
        if not split:
            torch.autograd.backward(outs, gs)
            for i, leaf in enumerate(self.leaves):
                if _diff(leaf):
                    result[i] = leaf.grad
            return tuple(result)
        self.deferred = WeightSplit(outs, gs, list(self.leaves))
        got = iter(self.deferred.input_grads())
        for i, leaf in enumerate(self.leaves):
            if _diff(leaf) and leaf.requires_grad:
                result[i] = next(got)
        return tuple(result)

    def backward_weights(self) -> None:
        """The deferred W of a split backward: accumulate the parameters' gradients."""
        if self.deferred is not None:
            self.deferred.weight_grads()
            self.deferred = None


def _a2a_async(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return out, (work, x)


def _off_rank_bytes(send_counts: list[int], recv_counts: list[int], me: int, row_bytes: int) -> int:
    return max(sum(send_counts) - send_counts[me], sum(recv_counts) - recv_counts[me]) * row_bytes


class _Rows:
    """The two fields GroupedExperts reads from a dispatch handle, with weights that carry autograd."""

    def __init__(self, tokens_per_expert: torch.Tensor, weights: torch.Tensor) -> None:
        self.tokens_per_expert, self.weights = tokens_per_expert, weights


class DispatchNode:
    """state (h, x, w, idx) -> (h, x, recv_x, recv_w); backward sends row gradients back to their tokens."""

    def __init__(self, dispatcher, link) -> None:
        self.group, self.num_experts = dispatcher.ep_group, dispatcher.num_experts
        self.capacity_factor, self.link = dispatcher.capacity_factor, link
        self.me = dist.get_rank(self.group)

    def start(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        self.x_shape, self.w_dtype, self.k, self.device = x.shape, w.dtype, idx.shape[1], x.device
        flat = x.detach().reshape(-1, x.shape[-1])
        self.handle = ep_ops.dispatch_async(flat, idx, w.detach(), self.group, self.num_experts,
                                            self.capacity_factor)
        if self.link is not None:
            h = self.handle
            row = flat.shape[1] * flat.element_size() + self.k * (8 + 4)
            h.delay(self.link, _off_rank_bytes(h.send_counts, h.recv_counts, self.me, row))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        recv = self.handle.wait()
        return recv, self.handle.recv_weights

    def start_backward(self, grads: tuple) -> None:
        g_h, g_x, g_recv, g_rw = grads
        h, hidden = self.handle, self.x_shape[-1]
        tok = h.num_recv_tokens
        dtype = g_x.dtype if g_x is not None else torch.float32
        g_tok = torch.zeros(tok, hidden, dtype=dtype, device=self.device)
        if g_recv is not None:
            g_tok.index_add_(0, h.recv_rows, g_recv.to(dtype))
        # each grouped row's (received token, top-k slot): the layout the weights travelled in
        g_wtok = torch.zeros(tok, self.k, dtype=self.w_dtype, device=self.device)
        if g_rw is not None:
            g_wtok.index_put_((h.recv_rows, h.recv_slots), g_rw.to(self.w_dtype), accumulate=True)
        self.saved = (g_h, g_x)
        self.back_x, wx = _a2a_async(g_tok, h.send_counts, h.recv_counts, self.group)
        self.back_w, ww = _a2a_async(g_wtok, h.send_counts, h.recv_counts, self.group)
        self.works = [wx, ww]
        if self.link is not None:
            row = hidden * g_tok.element_size() + self.k * g_wtok.element_size()
            self.link.wrap_works(self.works, _off_rank_bytes(h.recv_counts, h.send_counts, self.me, row))

    def finish_backward(self) -> tuple:
        for work, _ in self.works:
            work.wait()
        h, (g_h, g_x) = self.handle, self.saved
        n = h.num_tokens
        g_xd = torch.zeros(n, self.x_shape[-1], dtype=self.back_x.dtype, device=self.back_x.device).index_add_(
            0, h.send_token_idx, self.back_x).view(self.x_shape)
        g_w = torch.zeros(n, self.k, dtype=self.w_dtype, device=self.back_w.device).index_add_(
            0, h.send_token_idx, self.back_w)
        self.works = self.back_x = self.back_w = self.saved = None
        return (g_h, g_xd if g_x is None else g_x + g_xd, g_w, None)


class CombineNode:
    """state (h, x, y) -> (h, x, routed [N, H], shared(x)); backward sends token gradients out to the expert
    rows. The shared experts of the same micro-batch run while the combine (and its backward) travels."""

    def __init__(self, dnode: DispatchNode, link, shared, aux_scale: float) -> None:
        self.d, self.link, self.shared, self.aux_scale = dnode, link, shared, aux_scale
        self.segments: list[Segment] = []

    def start(self, y: torch.Tensor, x: torch.Tensor) -> None:
        self.ch = ep_ops.combine_async(y.detach(), self.d.handle)
        if self.link is not None:
            h = self.d.handle
            self.ch.delay(self.link, _off_rank_bytes(
                h.recv_counts, h.send_counts, self.d.me, y.shape[-1] * y.element_size()))
        self.shared_out = None
        if self.shared is not None:
            seg = Segment(lambda xn: ((self.shared(xn),), []), (x,), self.aux_scale)
            self.segments = [seg]
            self.shared_out = seg.outs[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.ch.wait()
        self.ch = None
        return out, self.shared_out

    def start_backward(self, grads: tuple, split: bool = False) -> None:
        g_h, g_x, g_routed, g_shared = grads
        h = self.d.handle
        send = g_routed.reshape(-1, g_routed.shape[-1]).index_select(0, h.send_token_idx)
        self.back, work = _a2a_async(send, h.recv_counts, h.send_counts, self.d.group)
        self.works = [work]
        if self.link is not None:
            self.link.wrap_works(self.works, _off_rank_bytes(
                h.send_counts, h.recv_counts, self.d.me, send.shape[-1] * send.element_size()))
        if self.segments and g_shared is not None:
            (g_xs,) = self.segments[0].backward((g_shared,), split)
            if g_xs is not None:
                g_x = g_xs if g_x is None else g_x + g_xs
        self.saved = (g_h, g_x)

    def finish_backward(self) -> tuple:
        for work, _ in self.works:
            work.wait()
        g_y = self.back.index_select(0, self.d.handle.recv_rows)
        g_h, g_x = self.saved
        self.works = self.back = self.saved = None
        return (g_h, g_x, g_y)


def is_ep_dispatcher(dispatcher: object) -> bool:
    """True for parallel.shard's EPDispatcher (the phase engine drives its all-to-alls itself)."""
    if not hasattr(dispatcher, "ep_group"):
        return False
    if getattr(dispatcher, "tp_group", None) is not None:
        raise NotImplementedError("the pipeline executor does not yet run EP dispatch with tp > 1 "
                                  "(tokens split over TP before dispatch); use tp=1 with pp x ep")
    return True


def stage_forward(stage, x: torch.Tensor, labels: torch.Tensor | None, loss_scale: float,
                  aux_scale: float, link=None) -> Phases:
    """Generator: the forward of `stage` on x (input_ids on the first stage, hidden states elsewhere).

    Returns (output, tape): hidden states, or on the last stage the loss sum(CE over tokens) / loss_scale
    (logits [B, T, V] when labels is None: forward-only pipelines).
    Yields right after starting each all-to-all.
    """
    tape: list = []
    state: tuple = (x,)
    pending: list[Callable] = []
    t = x.shape[1]
    dtype = next(stage.parameters()).dtype if any(True for _ in stage.parameters()) else torch.float32
    cos, sin = stage.rope(t, x.device, dtype)

    def flush() -> None:
        nonlocal state
        if not pending:
            return
        fns = list(pending)
        pending.clear()

        def fn(*s):
            aux: list = []
            for f in fns:
                s, a = f(*s)
                aux += a
            return s, aux

        seg = Segment(fn, state, aux_scale)
        tape.append(seg)
        state = seg.outs

    def aux_of(layer) -> list:
        gate = getattr(layer.mlp, "gate", None)
        a = getattr(gate, "last_aux_loss", None)
        return [a] if a is not None else []

    if stage.is_first:
        pending.append(lambda ids: ((stage.embed_tokens(ids),), []))
    for layer in stage.layers.values():
        if not (layer.is_moe and is_ep_dispatcher(layer.mlp.dispatcher)):
            pending.append(lambda h, layer=layer: ((layer(h, cos, sin),), aux_of(layer)))
            continue

        def attention_gate(h, layer=layer):
            h1, xn = layer.attention_phase(h, cos, sin)
            w, idx = layer.gate_phase(xn)
            return (h1, xn, w, idx), aux_of(layer)

        pending.append(attention_gate)
        flush()
        dnode = DispatchNode(layer.mlp.dispatcher, link)
        dnode.start(state[1], state[3], state[2])
        yield
        recv, recv_w = dnode.finish()
        tape.append(dnode)
        state = (state[0], state[1], recv, recv_w)
        tpe = dnode.handle.tokens_per_expert
        pending.append(lambda h1, xn, r, rw, layer=layer, tpe=tpe:
                       ((h1, xn, layer.expert_phase(r, _Rows(tpe, rw))), []))
        flush()
        cnode = CombineNode(dnode, link, layer.mlp.shared_experts, aux_scale)
        cnode.start(state[2], state[1])
        yield
        routed, shared_out = cnode.finish()
        tape.append(cnode)
        state = (state[0], state[1], routed, shared_out)
        pending.append(lambda h1, xn, r, sh: ((h1 + (r.view_as(xn) if sh is None else r.view_as(xn) + sh),), []))
    if stage.is_last:
        def head(h):
            logits = stage.lm_head(stage.norm(h)).float()
            if labels is None:
                return (logits,), []
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            return (ce / loss_scale,), []

        pending.append(head)
    flush()
    return state[0], tape


def stage_backward(tape: list, grad_out: torch.Tensor, split: bool = False, fill: bool = False) -> Phases:
    """Generator: backward through a forward's tape; returns the gradient of the stage input (or None).

    split: weight gradients are left for a later `stage_weight_backward` (zero-bubble I / W).
    fill: each segment's weight gradients run right after the next transfer has started, under it, instead
    of before it (DualPipe's F&B: the transfer then has W as well as the other micro-batch's compute to
    hide behind). The result equals a plain backward.
    """
    grads: tuple = (grad_out,)
    owed: list[Segment] = []  # segments whose W is still to run (fill)
    for node in reversed(tape):
        if isinstance(node, Segment):
            grads = node.backward(grads, split or fill)
            owed.append(node)
            continue
        if isinstance(node, CombineNode):
            node.start_backward(grads, split or fill)
            owed += node.segments
        else:
            node.start_backward(grads)
        if fill:
            for seg in owed:
                seg.backward_weights()
        owed.clear()
        yield
        grads = node.finish_backward()
    if fill:
        for seg in owed:
            seg.backward_weights()
    return grads[0]


def stage_weight_backward(tape: list) -> None:
    """The deferred W of a split backward: parameter gradients of every segment."""
    for node in reversed(tape):
        for seg in [node] if isinstance(node, Segment) else getattr(node, "segments", []):
            seg.backward_weights()


def run(gen: Phases):
    """Drive one phase generator to the end (each transfer waited at once)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run_pair(first: Phases, second: Phases) -> tuple:
    """Alternate two phase generators: each resumes (and waits for its transfer) after the other has
    computed up to its next transfer. Returns both results."""
    gens = {0: first, 1: second}
    results: list = [None, None]
    while gens:
        for i in list(gens):
            try:
                next(gens[i])
            except StopIteration as stop:
                results[i] = stop.value
                del gens[i]
    return results[0], results[1]
