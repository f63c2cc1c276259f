"""Tensor-parallel layers against nn.Linear / nn.Embedding / F.cross_entropy on the same weights.

Every rank builds the same full weights and data (same seed), runs the single-process reference and
the TP layer, and compares outputs and gathered gradients within 1e-5, for tp = 2 and 4 over gloo.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_spawn import ChildFailed, run_spawn

TOL = dict(atol=1e-5, rtol=1e-5)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, **TOL), f"{what}: max abs err {err}"


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    from parallel.tensor import all_gather_dim

    return all_gather_dim(x.detach(), dim, group)


def _check_linears(rank: int, tp: int, group) -> None:
    from parallel.tensor import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    B, T, H, FF = 2, 4, 16, 8 * tp
    x = torch.randn(B, T, H)
    w1, b1 = torch.randn(FF, H), torch.randn(FF)
    w2, b2 = torch.randn(H, FF), torch.randn(H)
    gy = torch.randn(B, T, H)

    # reference MLP: linear -> gelu -> linear
    ref1, ref2 = torch.nn.Linear(H, FF), torch.nn.Linear(FF, H)
    with torch.no_grad():
        ref1.weight.copy_(w1), ref1.bias.copy_(b1), ref2.weight.copy_(w2), ref2.bias.copy_(b2)
    xr = x.clone().requires_grad_()
    yr = ref2(F.gelu(ref1(xr)))
    yr.backward(gy)

    # column (sharded output) -> row (parallel input)
    col = ColumnParallelLinear.from_full(w1, group, bias=b1)
    row = RowParallelLinear.from_full(w2, group, bias=b2)
    assert col.weight.shape == (FF // tp, H) and row.weight.shape == (H, FF // tp)
    xp = x.clone().requires_grad_()
    yp = row(F.gelu(col(xp)))
    yp.backward(gy)
    _close(yp, yr, "mlp output")
    _close(xp.grad, xr.grad, "mlp input grad")
    _close(_gather(col.weight.grad, 0, group), ref1.weight.grad, "column weight grad")
    _close(_gather(col.bias.grad, 0, group), ref1.bias.grad, "column bias grad")
    _close(_gather(row.weight.grad, 1, group), ref2.weight.grad, "row weight grad")
    _close(row.bias.grad, ref2.bias.grad, "row bias grad")

    # column with gather_output, then row with a replicated input (input_is_parallel=False)
    ref1.zero_grad(), ref2.zero_grad()
    xr = x.clone().requires_grad_()
    yr = ref2(ref1(xr) * 0.5)
    yr.backward(gy)
    colg = ColumnParallelLinear.from_full(w1, group, bias=b1, gather_output=True)
    rowr = RowParallelLinear.from_full(w2, group, bias=b2, input_is_parallel=False)
    xp = x.clone().requires_grad_()
    mid = colg(xp)
    assert mid.shape == (B, T, FF)
    yp = rowr(mid * 0.5)
    yp.backward(gy)
    _close(yp, yr, "gathered mlp output")
    _close(xp.grad, xr.grad, "gathered mlp input grad")
    _close(_gather(colg.weight.grad, 0, group), ref1.weight.grad, "gather_output weight grad")
    _close(_gather(rowr.weight.grad, 1, group), ref2.weight.grad, "replicated-input row weight grad")


def _check_sequence_parallel(rank: int, tp: int, group) -> None:
    from parallel.tensor import (
        ColumnParallelLinear,
        RowParallelLinear,
        all_reduce_sequence_parallel_grads,
        gather_from_sp,
        scatter_to_sp,
        shard,
    )

    torch.manual_seed(1)
    B, T, H, FF = 2, 2 * tp, 8, 4 * tp
    x, gy = torch.randn(B, T, H), torch.randn(B, T, H)
    w1, w2, b2 = torch.randn(FF, H), torch.randn(H, FF), torch.randn(H)
    norm_w = torch.randn(H)
    xr = x.clone().requires_grad_()
    nr = norm_w.clone().requires_grad_()
    yr = F.linear(F.relu(F.linear(xr * nr, w1)), w2, b2)
    yr.backward(gy)

    col = ColumnParallelLinear.from_full(w1, group, bias=None, sequence_parallel=True)
    row = RowParallelLinear.from_full(w2, group, bias=b2, sequence_parallel=True)
    nw = torch.nn.Parameter(norm_w.clone())
    nw.sequence_parallel = True
    xp = x.clone().requires_grad_()
    xs = scatter_to_sp(xp, group, dim=1)  # this rank's sequence shard
    assert xs.shape == (B, T // tp, H)
    ys = row(F.relu(col(xs * nw)))
    assert ys.shape == (B, T // tp, H)
    _close(ys, shard(yr.detach(), 1, group), "sequence-parallel output shard")
    _close(gather_from_sp(ys, group, dim=1), yr, "sequence-parallel gathered output")
    ys.backward(shard(gy, 1, group))
    mod = torch.nn.Module()
    mod.nw, mod.row = nw, row
    all_reduce_sequence_parallel_grads(mod, group)
    _close(nw.grad, nr.grad, "sequence-parallel replicated (norm) grad")
    _close(row.bias.grad, gy.sum((0, 1)), "sequence-parallel row bias grad")
    _close(_gather(col.weight.grad, 0, group), _ref_w1_grad(x, norm_w, w1, w2, b2, gy),
           "sequence-parallel column weight grad")
    _close(_gather(row.weight.grad, 1, group), _ref_w2_grad(x, norm_w, w1, w2, b2, gy),
           "sequence-parallel row weight grad")
    _close(xp.grad, xr.grad, "sequence-parallel input grad")


def _ref_w2_grad(x, norm_w, w1, w2, b2, gy):
    w = w2.clone().requires_grad_()
    F.linear(F.relu(F.linear(x * norm_w, w1)), w, b2).backward(gy)
    return w.grad


def _ref_w1_grad(x, norm_w, w1, w2, b2, gy):
    w = w1.clone().requires_grad_()
    F.linear(F.relu(F.linear(x * norm_w, w)), w2, b2).backward(gy)
    return w.grad


def _check_embedding_and_ce(rank: int, tp: int, group) -> None:
    from parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy

    torch.manual_seed(2)
    V, H, B, T = 12 * tp, 8, 2, 5
    emb_w, head_w = torch.randn(V, H), torch.randn(V, H)
    ids = torch.randint(0, V, (B, T))
    target = torch.randint(0, V, (B, T))
    target[0, 1] = -100  # ignored position
    target[1, 2] = V - 1  # lives on the last rank

    ref_emb = torch.nn.Embedding(V, H)
    ref_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        ref_emb.weight.copy_(emb_w), ref_head.weight.copy_(head_w)
    logits_r = ref_head(ref_emb(ids))
    loss_r = F.cross_entropy(logits_r.flatten(0, 1), target.flatten())
    loss_r.backward()

    emb = VocabParallelEmbedding.from_full(emb_w, group)
    head = ColumnParallelLinear.from_full(head_w, group, bias=None)
    h = emb(ids)
    _close(h, ref_emb(ids), "vocab-parallel embedding output")
    local_logits = head(h)
    assert local_logits.shape == (B, T, V // tp), "cross-entropy input must stay vocab-sharded"
    loss = vocab_parallel_cross_entropy(local_logits, target, group)
    _close(loss, loss_r, "vocab-parallel cross-entropy")
    loss.backward()
    _close(_gather(emb.weight.grad, 0, group), ref_emb.weight.grad, "embedding grad")
    _close(_gather(head.weight.grad, 0, group), ref_head.weight.grad, "lm head grad")

    # per-token losses and sum reduction, with a large logit offset (exercises the max shift)
    z = torch.randn(B, T, V) * 30
    zr = z.clone().requires_grad_()
    F.cross_entropy(zr.flatten(0, 1), target.flatten(), reduction="sum").backward()
    from parallel.tensor import shard

    zp = shard(z, 2, group).requires_grad_()
    per_tok = vocab_parallel_cross_entropy(zp, target, group, reduction="none")
    _close(per_tok, F.cross_entropy(z.flatten(0, 1), target.flatten(), reduction="none").view(B, T),
           "per-token cross-entropy")
    per_tok.sum().backward()
    _close(_gather(zp.grad, 2, group), zr.grad, "cross-entropy logits grad")


def _tp_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    _check_linears(rank, world, group)
    _check_sequence_parallel(rank, world, group)
    _check_embedding_and_ce(rank, world, group)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_parity(tp: int) -> None:
    run_spawn(_tp_worker, tp)


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    import torch.distributed as dist

    dist.barrier()  # rank 0 would wait forever: the harness must stop it


@pytest.mark.timeout(60)
def test_harness_reports_child_traceback() -> None:
    with pytest.raises(ChildFailed, match="deliberate failure on rank 1"):
        run_spawn(_failing_worker, 2)


def test_single_rank_layers_and_errors() -> None:
    """group=None means tp=1: the layers reduce to their plain twins; uneven splits are clear errors."""
    from parallel.tensor import ColumnParallelLinear, RowParallelLinear, divide, vocab_parallel_cross_entropy

    torch.manual_seed(3)
    w = torch.randn(6, 4)
    x = torch.randn(3, 4)
    _close(ColumnParallelLinear.from_full(w, None, bias=None)(x), x @ w.T, "tp=1 column")
    _close(RowParallelLinear.from_full(w, None, bias=None)(x), x @ w.T, "tp=1 row")
    z, t = torch.randn(3, 6), torch.tensor([0, 5, -100])
    _close(vocab_parallel_cross_entropy(z, t, None), F.cross_entropy(z, t), "tp=1 cross-entropy")
    with pytest.raises(ValueError, match="not divisible"):
        divide(10, 4, "out_features")
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(z, t, None, reduction="avg")
