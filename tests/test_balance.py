"""Aux-loss-free bias update and the sequence-wise balance loss."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as ckpt
from dist_spawn import run_spawn

from parallel.balance import ExpertBalancer, expert_load, sequence_balance_loss

E = 6


def _idx(counts: list[int]) -> torch.Tensor:
    """A topk_idx [N, 1] whose load is exactly `counts`."""
    return torch.cat([torch.full((c, 1), e) for e, c in enumerate(counts)])


def test_one_step_moves_each_bias_by_the_rate() -> None:
    b0 = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.1])
    bias = b0.clone()
    rate = 0.001
    bal = ExpertBalancer([bias], rate)
    counts = [1, 5, 3, 3, 0, 6]  # mean 3: up, down, none, none, up, down
    bal.record(0, _idx(counts))
    loads = bal.step()
    assert loads[0].tolist() == counts
    sign = torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0])
    assert torch.equal(bias, b0 + rate * sign)
    assert bal.pending_loads().sum() == 0, "step resets the counts"
    bal.step()  # no tokens at all: every load equals the mean, nothing moves
    assert torch.equal(bias, b0 + rate * sign)


def test_gradient_accumulation_and_recompute_count_once() -> None:
    bias = torch.zeros(E)
    bal = ExpertBalancer([bias, torch.zeros(E)], 0.01)
    gate = torch.nn.Linear(4, E)
    torch.manual_seed(0)
    micro = [torch.randn(5, 4) for _ in range(3)]

    def layer(x: torch.Tensor) -> torch.Tensor:
        scores = gate(x).sigmoid()
        idx = scores.topk(2, dim=-1).indices
        bal.record(0, idx)
        return scores.gather(1, idx).sum(1, keepdim=True) * x

    expected = torch.zeros(E, dtype=torch.long)
    for i, x in enumerate(micro):
        with torch.no_grad():
            expected += expert_load(gate(x).sigmoid().topk(2, dim=-1).indices, E)
        xr = x.requires_grad_()
        out = ckpt.checkpoint(layer, xr, use_reentrant=(i % 2 == 0))  # backward re-runs `layer`
        out.sum().backward()
    assert torch.equal(bal.pending_loads()[0], expected)
    # keyed records replace each other (a caller that re-runs a micro-batch's forward on purpose)
    bal.record(1, _idx([2, 0, 0, 0, 0, 0]), microbatch=7)
    bal.record(1, _idx([2, 0, 0, 0, 0, 0]), microbatch=7)
    bal.record(1, _idx([0, 1, 0, 0, 0, 0]), microbatch=8)
    assert bal.pending_loads()[1].tolist() == [2, 1, 0, 0, 0, 0]
    bal.record_counts(1, torch.tensor([0, 0, 5, 0, 0, 0]))
    assert bal.pending_loads()[1].tolist() == [2, 1, 5, 0, 0, 0]
    loads = bal.step()
    assert torch.equal(loads[0], expected)


def _reference_sequence_loss(scores, idx, alpha, mask=None):
    B, T, E_ = scores.shape
    K = idx.shape[-1]
    total = 0.0
    for b in range(B):
        ts = [t for t in range(T) if mask is None or bool(mask[b, t])]
        loss = 0.0
        for i in range(E_):
            f = E_ / (K * len(ts)) * sum(1 for t in ts if i in idx[b, t].tolist())
            p = sum(scores[b, t, i] / scores[b, t].sum() for t in ts) / len(ts)
            loss = loss + f * p
        total = total + loss
    return alpha * total / B


def test_sequence_balance_loss_matches_eq_17_to_20() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, E, requires_grad=True)
    scores = logits.sigmoid()
    idx = scores.topk(2, dim=-1).indices
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    for m in (None, mask):
        got = sequence_balance_loss(scores, idx, 0.01, m)
        ref = _reference_sequence_loss(scores, idx, 0.01, m)
        torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-6)
        (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, logits, retain_graph=True)
        torch.testing.assert_close(g_got, g_ref, atol=1e-7, rtol=1e-6)
    # perfectly balanced routing and uniform scores give alpha * 1 per sequence
    uni = torch.full((1, E, E), 0.5)
    rot = torch.arange(E).view(1, E, 1)
    assert abs(float(sequence_balance_loss(uni, rot, 0.3)) - 0.3) < 1e-7


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same number of experts"):
        ExpertBalancer([torch.zeros(4), torch.zeros(5)], 0.1)
    with pytest.raises(IndexError, match="layer 3"):
        ExpertBalancer([torch.zeros(4)], 0.1).record(3, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must have shape"):
        ExpertBalancer([torch.zeros(4)], 0.1).record_counts(0, torch.zeros(5))
    with pytest.raises(ValueError, match="B,T,E"):
        sequence_balance_loss(torch.rand(3, E), torch.zeros(3, 2, dtype=torch.long), 0.1)


def _balance_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    singles = [dist.new_group([r]) for r in range(world)]
    b0 = torch.linspace(-0.5, 0.5, E)
    biases = [b0.clone(), b0.clone()]
    # a sequence of groups whose product is the world (like [dp, tp] of a stage) reduces over all of it
    bal = ExpertBalancer(biases, 0.125, [singles[rank], group])
    # every rank sees different loads; two micro-batches each
    per_rank = [[[3, 0, 1, 2, 0, 0], [0, 1, 0, 0, 0, 5]], [[0, 0, 4, 0, 2, 0], [1, 1, 1, 1, 1, 1]]]
    for mb in per_rank[rank]:
        bal.record(0, _idx(mb))
        bal.record(1, _idx(mb[::-1]))
    loads = bal.step()
    total = [sum(mb[e] for r in per_rank for mb in r) for e in range(E)]  # [4, 2, 6, 3, 3, 6]
    assert loads[0].tolist() == total and loads[1].tolist() == total[::-1]
    for layer, bias in enumerate(biases):
        t = torch.tensor(total if layer == 0 else total[::-1], dtype=torch.float64)
        want = b0 + 0.125 * torch.sign(t.mean() - t).float()
        assert torch.equal(bias, want), (layer, bias, want)
        everyone = [torch.empty(E) for _ in range(world)]
        dist.all_gather(everyone, bias, group=group)
        assert all(torch.equal(everyone[0], b) for b in everyone), "biases differ across ranks"


@pytest.mark.timeout(60)
def test_bias_update_identical_on_every_rank() -> None:
    run_spawn(_balance_worker, 2)
