"""WeightSplit: input-gradient pass + weight-gradient pass == one backward, with no GEMM done twice."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from parallel.pipeline.wgrad import WeightSplit


class Block(torch.nn.Module):
    """Linears with and without bias, a bare matmul weight, a norm weight, a weight behind an element-wise
    op, two outputs; `tied=True` uses one weight twice (its second use downstream of the first)."""

    def __init__(self, d: int = 16, tied: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(d, 2 * d)
        self.b = torch.nn.Linear(2 * d, d, bias=False)
        self.c = torch.nn.Parameter(torch.randn(d, d) / d)
        self.e = self.c if tied else torch.nn.Parameter(torch.randn(d, d) / d)
        self.norm = torch.nn.Parameter(torch.ones(d))
        self.offset = torch.nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.a(x))
        h = self.b(h) @ self.c
        h = F.rms_norm(h, (h.shape[-1],), self.norm) @ self.e + y
        return h, (h * self.offset.tanh()).sum(-1)


def _leaves(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 16, generator=g, requires_grad=True), torch.randn(4, 16, generator=g, requires_grad=True))


def _compare(tied: bool) -> tuple[int, int, int]:
    """I + W against one backward on the same graph; returns the FLOPs of (I, W, plain backward)."""
    torch.manual_seed(0)
    model = Block(tied=tied)
    gh, gs = torch.randn(4, 16), torch.randn(4)

    x, y = _leaves(1)
    out = model(x, y)
    with FlopCounterMode(display=False) as full:
        torch.autograd.backward(list(out), [gh, gs])
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_x, ref_y = x.grad.clone(), y.grad.clone()
    model.zero_grad(set_to_none=True)

    x, y = _leaves(1)
    out = model(x, y)
    split = WeightSplit(list(out), [gh, gs], [x, y])
    with FlopCounterMode(display=False) as first:
        dx, dy = split.input_grads()
    assert all(p.grad is None for p in model.parameters())  # I touched no weight gradient
    with FlopCounterMode(display=False) as second:
        split.weight_grads()
    torch.testing.assert_close(dx, ref_x)
    torch.testing.assert_close(dy, ref_y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    return first.get_total_flops(), second.get_total_flops(), full.get_total_flops()


def test_split_equals_backward_and_does_no_gemm_twice() -> None:
    i, w, full = _compare(tied=False)
    assert i > 0 and w > 0
    assert i + w == full


def test_tied_weight_is_exact() -> None:
    i, w, full = _compare(tied=True)  # the tied weight takes the plain route: correct, some work repeated
    assert i > 0 and w > 0 and i + w >= full


def test_no_differentiable_input_defers_everything_to_w() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 8)
    lin = torch.nn.Linear(8, 8)
    ids = torch.tensor([[1, 2, 3]])
    out = lin(emb(ids))
    g = torch.randn_like(out)
    split = WeightSplit([out], [g], [ids])
    assert split.input_grads() == []
    assert emb.weight.grad is None
    split.weight_grads()
    got = (emb.weight.grad.clone(), lin.weight.grad.clone())
    emb.zero_grad(set_to_none=True)
    lin.zero_grad(set_to_none=True)
    lin(emb(ids)).backward(g)
    torch.testing.assert_close(got[0], emb.weight.grad)
    torch.testing.assert_close(got[1], lin.weight.grad)
