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

The engine composes the model's own decoder layer; what it needs of a layer (the phase protocol):
`is_moe`; `attention_phase(h, cos, sin) -> (h, x)`; `gate_phase(x) -> (weights, ids)`; `dispatcher` (a
parallel.expert.Dispatcher; its transfers, and their emulated link, are the ones the engine drives);
`expert_phase(rows, tokens_per_expert, weights) -> y`; `shared_phase(x) -> y | None`;
`finish_phase(h, routed, shared) -> h`; `aux_loss` (the gate's balance loss or None); and calling the layer
is its whole forward. Layers without an expert-parallel dispatcher (dense layers, one process) run as plain
compute. The comm nodes' backward buffers are made by parallel.expert on the device of the tokens they
carry, so CPU and CUDA stages run the same code.
The same code path runs for F, B, I/W and FB, so the parity tests of the executor cover it all.

Split backward (zero-bubble I / W, parallel/pipeline/wgrad.py): I computes the gradients of each segment's
leaves only, recording the gradient that reaches every weight's joint with the input path; W starts there
and computes only the weight-gradient side (no input-gradient GEMM runs twice). An FB's backward uses the
same split to run each segment's W right after the next transfer has started, so that transfer hides
behind W as well as behind the other micro-batch's forward (DualPipe's MLP(W) / ATTN(W) placement).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
import torch.nn.functional as F

from ops import IGNORE_INDEX

from .wgrad import WeightSplit

Phases = Generator[None, None, object]


def _diff(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class Segment:
    """Compute on detached leaves: fn(*leaves) -> (outputs, aux scalars). Backward stops at the leaves."""

    def __init__(self, fn: Callable, inputs: tuple, aux_scale: float, side: bool = False) -> None:
        track = torch.is_grad_enabled()  # under no_grad (forward-only pipelines) no graph is kept
        self.leaves = tuple(x.detach().requires_grad_(track) if _diff(x) else x for x in inputs)
        outs, aux = fn(*self.leaves)
        self.outs, self.aux, self.aux_scale = tuple(outs), list(aux), aux_scale
        self.side = side  # its last leaf is the stage's side input (its gradient leaves the stage apart)
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


class DispatchNode:
    """state (h, x, w, idx) -> (h, x, rows, row_weights); backward returns row gradients to their tokens
    (the handle's combine transfers: dispatch's backward is a combine)."""

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher

    def start(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        self.x_shape, self.w_dtype = x.shape, w.dtype
        self.handle = self.dispatcher.dispatch_async(x.detach().reshape(-1, x.shape[-1]), idx, w.detach())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.handle.wait()
        return rows, self.handle.recv_weights

    def start_backward(self, grads: tuple) -> None:
        g_h, g_x, g_rows, g_rw = grads
        h = self.handle
        n_rows = h.recv_rows.shape[0]
        dtype = g_x.dtype if g_x is not None else torch.float32
        g_rows = torch.zeros(n_rows, self.x_shape[-1], dtype=dtype, device=h.recv_rows.device) \
            if g_rows is None else g_rows.to(dtype)
        g_rw = torch.zeros(n_rows, dtype=self.w_dtype, device=h.recv_rows.device) if g_rw is None \
            else g_rw.to(self.w_dtype)
        self.saved = (g_h, g_x)
        self.back = h.combine_async(g_rows, slot_values=g_rw)

    def finish_backward(self) -> tuple:
        g_xd, g_w = self.back.wait()
        g_h, g_x = self.saved
        self.back = self.saved = None
        g_xd = g_xd.view(self.x_shape)
        return (g_h, g_xd if g_x is None else g_x + g_xd, g_w, None)


class CombineNode:
    """state (h, x, y) -> (h, x, routed [N, H], shared(x)); backward sends token gradients out to the expert
    rows (the handle's resend: combine's backward is a dispatch). The shared experts of the same micro-batch
    run while the combine (and its backward) travels."""

    def __init__(self, dnode: DispatchNode, layer, aux_scale: float) -> None:
        self.d, self.layer, self.aux_scale = dnode, layer, aux_scale
        self.segments: list[Segment] = []

    def start(self, y: torch.Tensor, x: torch.Tensor) -> None:
        self.transfer = self.d.handle.combine_async(y.detach())
        seg = Segment(lambda xn: ((self.layer.shared_phase(xn),), []), (x,), self.aux_scale)
        self.segments = [seg]
        self.shared_out = seg.outs[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.transfer.wait()
        self.transfer = None
        return out, self.shared_out

    def start_backward(self, grads: tuple, split: bool = False) -> None:
        g_h, g_x, g_routed, g_shared = grads
        self.back = self.d.handle.resend_async(g_routed.reshape(-1, g_routed.shape[-1]))
        if g_shared is not None:
            (g_xs,) = self.segments[0].backward((g_shared,), split)
            if g_xs is not None:
                g_x = g_xs if g_x is None else g_x + g_xs
        self.saved = (g_h, g_x)

    def finish_backward(self) -> tuple:
        g_y = self.back.wait()
        g_h, g_x = self.saved
        self.back = self.saved = None
        return (g_h, g_x, g_y)


def overlapped(layer) -> bool:
    """Whether the engine drives this layer's all-to-alls itself (an MoE layer with an EP group)."""
    d = layer.dispatcher if layer.is_moe else None
    if d is None or d.group is None:
        return False
    if d.tp_group is not None:
        raise NotImplementedError("the pipeline executor does not yet run EP dispatch with tp > 1 "
                                  "(tokens split over TP before dispatch); use tp=1 with pp x ep")
    return True


def stage_forward(stage, x: torch.Tensor, labels: torch.Tensor | None, loss_scale: float,
                  aux_scale: float, side: torch.Tensor | None = None, mtp_scale: Sequence[float] = (),
                  parts: dict | None = None) -> Phases:
    """Generator: the forward of `stage` on x (input_ids on the first stage, hidden states elsewhere).

    Returns (output, tape): hidden states, or on the last stage the loss sum(CE over tokens) / loss_scale
    (logits [B, T, V] when labels is None: forward-only pipelines; `labels` may instead be a function of the
    fp32 logits giving the loss term). On a last stage with MTP modules,
    `side` is the first stage's embedding output [B, T, H] and the loss adds sum_k mtp_scale[k] * sum(CE of
    MTP module k) (module k predicts labels[t+k+1] at position t from the normed hidden state and the next
    tokens' embeddings); `side`'s gradient comes out of `stage_backward` apart from the input's. `parts` receives the
    detached terms ("ce", "mtp"). Yields right after starting each all-to-all.
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
        return [layer.aux_loss] if layer.aux_loss is not None else []

    if stage.is_first:
        pending.append(lambda ids: ((stage.embed_tokens(ids),), []))
    for layer in stage.layers.values():
        if not overlapped(layer):
            pending.append(lambda h, layer=layer: ((layer(h, cos, sin),), aux_of(layer)))
            continue

        def attention_gate(h, layer=layer):
            h1, xn = layer.attention_phase(h, cos, sin)
            w, idx = layer.gate_phase(xn)
            return (h1, xn, w, idx), aux_of(layer)

        pending.append(attention_gate)
        flush()
        dnode = DispatchNode(layer.dispatcher)
        dnode.start(state[1], state[3], state[2])
        yield
        rows, row_w = dnode.finish()
        tape.append(dnode)
        state = (state[0], state[1], rows, row_w)
        tpe = dnode.handle.tokens_per_expert
        pending.append(lambda h1, xn, r, rw, layer=layer, tpe=tpe: ((h1, xn, layer.expert_phase(r, tpe, rw)), []))
        flush()
        cnode = CombineNode(dnode, layer, aux_scale)
        cnode.start(state[2], state[1])
        yield
        routed, shared_out = cnode.finish()
        tape.append(cnode)
        state = (state[0], state[1], routed, shared_out)
        pending.append(lambda h1, xn, r, sh, layer=layer: ((layer.finish_phase(h1, r, sh),), []))
    if stage.is_last:
        def head(h, e=None):
            hn = stage.norm(h)
            logits = stage.lm_head(hn).float()
            if labels is None:
                return (logits,), []
            if callable(labels):  # the caller's loss term (e.g. a policy-gradient loss over the tokens)
                loss = labels(logits)
                if parts is not None:
                    parts["ce"] = loss.detach()
                return (loss,), []
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / loss_scale
            if parts is not None:
                parts["ce"] = loss.detach()
            if e is not None and stage.mtp_loss is not None:
                sums = stage.mtp_loss(hn, e, labels)
                mtp = (sums * torch.tensor(mtp_scale[: sums.shape[0]], dtype=sums.dtype, device=sums.device)).sum()
                if parts is not None:
                    parts["mtp"] = mtp.detach()
                return (loss + mtp,), [a for layer in stage.mtp if (a := layer.aux_loss) is not None]
            return (loss,), []

        if side is not None and labels is not None:  # the head as its own segment, the side input a leaf
            flush()
            seg = Segment(head, (*state, side), aux_scale, side=True)
            tape.append(seg)
            return seg.outs[0], tape
        pending.append(head)
    flush()
    return state[0], tape


def stage_backward(tape: list, grad_out: torch.Tensor, split: bool = False, fill: bool = False) -> Phases:
    """Generator: backward through a forward's tape; returns (the gradient of the stage input or None, the
    gradient of its side input or None).

    split: weight gradients are left for a later `stage_weight_backward` (zero-bubble I / W).
    fill: each segment's weight gradients run right after the next transfer has started, under it, instead
    of before it (DualPipe's F&B: the transfer then has W as well as the other micro-batch's compute to
    hide behind). The result equals a plain backward.
    """
    grads: tuple = (grad_out,)
    g_side = None
    owed: list[Segment] = []  # segments whose W is still to run (fill)
    for node in reversed(tape):
        if isinstance(node, Segment):
            grads = node.backward(grads, split or fill)
            if node.side:
                grads, g_side = grads[:-1], grads[-1]
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
    return grads[0], g_side


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
