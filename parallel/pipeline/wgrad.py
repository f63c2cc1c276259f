"""Split one autograd graph's backward into an input-gradient pass (I) and a weight-gradient pass (W) with
no recomputation between them.

Zero-bubble schedules and DualPipe's overlapped F&B both need the weight gradients of a chunk later than its
input gradients. Asking autograd for the parameters later (`backward(inputs=params)`) would walk the whole
graph again, repeating every input-gradient GEMM on the way. Instead, the I pass records the gradient that
arrives at each *joint*: a graph node that lies on the path from the inputs to the outputs and that a
parameter feeds (for a linear layer, the matmul node). The W pass starts at those joints with the recorded
gradients and walks only the parameter side (for a linear layer, the one GEMM x^T dy). The idea is the one
of PyTorch's `torch.distributed.pipelining` (`stage_backward_input` / `stage_backward_weight`); this is a
compact version for our segments, whose inputs are detached leaves.

    split = WeightSplit(outputs, grad_outputs, leaves)
    input_grads = split.input_grads()       # I: gradients of the leaves (None where unused)
    ...                                     # anything, e.g. start a transfer
    split.weight_grads()                    # W: accumulates into each parameter's .grad

A parameter used at several places of the graph (tied weights), or one that reaches the outputs without
touching the input path (the embedding of a first stage, whose input ids are not differentiable), gets its
gradient in W by a plain `autograd.grad` from the outputs: correct, though for a tied weight it repeats part
of the input-gradient work. Our decoder stages use every weight once.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
from torch.autograd.graph import GradientEdge, Node


def _grad_acc(t: torch.Tensor) -> Node | None:
    """The AccumulateGrad node of a leaf tensor that requires grad (created lazily, hence the view)."""
    if t.grad_fn is not None:
        return t.grad_fn
    fn = t.view_as(t).grad_fn
    return fn.next_functions[0][0] if fn is not None else None


def _consumers(roots: list[Node]) -> dict[Node, list[Node]]:
    """node -> the nodes that take its output (edges reversed: from the inputs towards the outputs)."""
    users: dict[Node, list[Node]] = defaultdict(list)
    seen = set(roots)
    q = deque(roots)
    while q:
        node = q.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            users[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                q.append(nxt)
    return users


class WeightSplit:
    """The I and W halves of backward(outputs, grad_outputs) for a graph whose inputs are `leaves`."""

    def __init__(self, outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor], leaves: list) -> None:
        self.outputs, self.grad_outputs = outputs, grad_outputs
        self.leaves = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        roots = [o.grad_fn for o in outputs if o.grad_fn is not None]
        users = _consumers(roots)
        leaf_nodes = {n for n in map(_grad_acc, self.leaves) if n is not None}
        # nodes on a path from the leaves to the outputs: the I pass runs exactly these
        on_path: set[Node] = set()
        q = deque(leaf_nodes)
        while q:
            for user in users[q.popleft()]:
                if user not in on_path:
                    on_path.add(user)
                    q.append(user)
        # every parameter: the nodes on its way to the path (its private sub-graph) and its joints with the path
        reach: dict[Node, tuple[set[Node], set[Node]]] = {}
        for node in list(users):
            var = getattr(node, "variable", None)
            if var is None or node in leaf_nodes or not var.requires_grad:
                continue
            mine, seen, q = set(), {node}, deque([node])
            while q:
                for user in users[q.popleft()]:
                    if user in on_path:
                        mine.add(user)
                    elif user not in seen:
                        seen.add(user)
                        q.append(user)
            reach[node] = (seen, mine)
        # A parameter with several joints (a weight used twice, tied weights) could reach one joint from the
        # input side of another, so a joint-by-joint W would count it twice: such parameters, and those
        # sharing sub-graph nodes with them, take the plain route from the outputs (correct, not cheapest),
        # as do parameters that reach the outputs without touching the path (all of them when the graph has
        # no differentiable input).
        plain = {n for n, (_, mine) in reach.items() if len(mine) != 1}
        grew = True
        while grew:
            taken = set().union(*(reach[n][0] for n in plain)) if plain else set()
            more = {n for n, (seen, _) in reach.items() if n not in plain and seen & taken}
            plain |= more
            grew = bool(more)
        private = set().union(*(reach[n][0] for n in reach if n not in plain)) if reach else set()
        joints = set().union(*(reach[n][1] for n in reach if n not in plain)) if reach else set()
        self.plain_params = [n.variable for n in plain]
        # per joint, the inputs that come from the parameter side: W computes only those
        self.param_side = {j: [(n, k) for n, k in j.next_functions if n in private] for j in joints}
        self.params = [n.variable for n in reach if n not in plain]
        self.seen_grads: dict[Node, tuple] = {}

    def input_grads(self) -> list[torch.Tensor | None]:
        """Run I: the leaves' gradients, recording what arrives at every joint. Keeps the graph for W."""
        if not self.leaves:
            return []
        handles = []

        def record(node: Node):
            def hook(grad_outputs: tuple) -> None:
                self.seen_grads[node] = grad_outputs
            return hook

        for j in self.param_side:
            handles.append(j.register_prehook(record(j)))
        try:
            return list(torch.autograd.grad(self.outputs, self.leaves, self.grad_outputs, retain_graph=True,
                                            allow_unused=True))
        finally:
            for h in handles:
                h.remove()

    def weight_grads(self) -> None:
        """Run W: accumulate every parameter's gradient into .grad; frees the graph.

        Joint by joint: the recorded gradient at the joint, pushed into its parameter-side inputs only
        (one call per joint, so that no joint's input-side GEMM runs again to feed another joint); then
        from those inputs down to the parameters in one call."""
        at_edge: dict[tuple[Node, int], torch.Tensor] = {}
        for j, recorded in self.seen_grads.items():
            outs = [(GradientEdge(j, i), g) for i, g in enumerate(recorded) if g is not None]
            ins = self.param_side[j]
            if not outs or not ins:
                continue
            got = torch.autograd.grad([e for e, _ in outs], [GradientEdge(n, k) for n, k in ins],
                                      [g for _, g in outs], retain_graph=True, allow_unused=True)
            for edge, g in zip(ins, got, strict=True):
                if g is not None:
                    at_edge[edge] = g if edge not in at_edge else at_edge[edge] + g
        direct = {e: g for e, g in at_edge.items() if getattr(e[0], "variable", None) is not None}
        for (node, _), g in direct.items():
            _accumulate([node.variable], [g])
        rest = [(e, g) for e, g in at_edge.items() if e not in direct]
        if rest:
            got = torch.autograd.grad([GradientEdge(n, k) for (n, k), _ in rest], self.params,
                                      [g for _, g in rest], retain_graph=bool(self.plain_params),
                                      allow_unused=True)
            _accumulate(self.params, got)
        if self.plain_params:
            got = torch.autograd.grad(self.outputs, self.plain_params, self.grad_outputs, allow_unused=True)
            _accumulate(self.plain_params, got)
        self.outputs = self.grad_outputs = self.param_side = self.seen_grads = self.params = self.plain_params = None


def _accumulate(params: list[torch.Tensor], grads) -> None:
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad += g
