"""EP dispatcher tests in DeepEP's style, over gloo with spawned ranks.

Every rank regenerates every rank's tokens and routing from one seed, so it can compute exactly what
it should receive and what combine should return. Layout: E = 2 * world experts, 2 per rank. The last
rank dispatches no tokens at all; no token is routed to rank world-2's experts (it receives nothing);
token counts differ per rank (uneven splits).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_spawn import run_spawn

H, K, EPR = 4, 2, 2


def _routing(world: int, seed: int = 0):
    """Per source rank: (x, topk_idx, topk_weights). x rows are `100*rank + token` (DeepEP's ones*rank)."""
    g = torch.Generator().manual_seed(seed)
    E = EPR * world
    banned = {(world - 2) * EPR + j for j in range(EPR)}
    allowed = torch.tensor([e for e in range(E) if e not in banned])
    out = []
    for s in range(world):
        n = 0 if s == world - 1 else 3 + 2 * s
        x = (100.0 * s + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, H)
        idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(n)]) \
            if n else torch.empty(0, K, dtype=torch.long)
        if n > 2:
            idx[1, 1] = -1  # an unused slot
        w = torch.randint(1, 8, (n, K), generator=g).float() / 8  # dyadic: sums are exact
        out.append((x, idx, w))
    return out


def _expected_rows(world: int, me: int, routes):
    """(x rows, weights, tokens_per_expert) rank `me` must receive, grouped by local expert."""
    rows, weights, counts = [], [], []
    for local in range(EPR):
        e = me * EPR + local
        c = 0
        for s in range(world):
            x, idx, w = routes[s]
            for n in range(x.shape[0]):
                for k in range(K):
                    if idx[n, k] == e:
                        rows.append(x[n]), weights.append(w[n, k])
                        c += 1
        counts.append(c)
    if rows:
        return torch.stack(rows), torch.stack(weights), torch.tensor(counts)
    return torch.empty(0, H), torch.empty(0), torch.tensor(counts)


def _dispatch_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    from parallel.expert import combine, combine_async, dispatch, dispatch_async, global_expert_counts

    group = dist.new_group(list(range(world)))
    E = EPR * world
    routes = _routing(world)
    x, idx, w = routes[rank]

    # 1. received rows: grouped per local expert, source rank then source token within an expert
    recv_x, handle = dispatch(x, idx, w, group, E)
    exp_x, exp_w, exp_counts = _expected_rows(world, rank, routes)
    assert torch.equal(handle.tokens_per_expert, exp_counts), (handle.tokens_per_expert, exp_counts)
    assert torch.equal(recv_x, exp_x), (recv_x, exp_x)
    assert torch.equal(handle.recv_weights, exp_w)
    # recv_slots: each grouped row's top-k slot in its source token (same order as the rows above)
    exp_slots = [k for local in range(EPR) for s in range(world) for n in range(routes[s][0].shape[0])
                 for k in range(K) if routes[s][1][n, k] == rank * EPR + local]
    assert handle.recv_slots.tolist() == exp_slots, (handle.recv_slots, exp_slots)
    assert handle.recv_slots.shape == handle.recv_rows.shape
    if rank == world - 2:
        assert recv_x.shape[0] == 0 and handle.num_recv_tokens == 0
    if rank == world - 1:
        assert x.shape[0] == 0 and sum(handle.send_counts) == 0
    # dedup: a token routed to 2 experts of the same rank is sent once
    for dst in range(world):
        want = int(((idx // EPR) == dst).any(1).sum())
        assert handle.send_counts[dst] == want

    # 2. identity experts: combine returns the weighted sum exactly
    y = recv_x * handle.recv_weights.unsqueeze(1)
    out = combine(y, handle)
    ref = (w * (idx >= 0)).sum(1, keepdim=True) * x
    assert torch.equal(out, ref), (out, ref)

    # 3. expert load counts
    all_idx = torch.cat([r[1] for r in routes])
    want_counts = torch.bincount(all_idx[all_idx >= 0], minlength=E)
    assert torch.equal(global_expert_counts(handle), want_counts)
    assert handle.num_dropped == 0

    # 4. dispatch's backward is a combine (and combine's backward is a dispatch), exactly
    xg = x.clone().requires_grad_()
    recv, h2 = dispatch(xg, idx, w, group, E)
    G = torch.arange(recv.numel(), dtype=torch.float32).view_as(recv) % 7 - 3
    (gx,) = torch.autograd.grad((recv * G).sum(), xg, allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    assert torch.equal(gx, combine(G, h2)), "dispatch backward != combine"
    yg = G.clone().requires_grad_()
    Gx = torch.arange(x.numel(), dtype=torch.float32).view_as(x) % 5 - 2
    (gy,) = torch.autograd.grad((combine(yg, h2) * Gx).sum(), yg, allow_unused=True)
    gy = torch.zeros_like(G) if gy is None else gy
    assert torch.equal(gy, dispatch(Gx, idx, w, group, E)[0]), "combine backward != dispatch"

    # 5. gradients through a real MoE layer equal a single-process reference over all ranks' tokens
    _check_moe_grads(rank, world, group, E)

    # 6. async: work placed between start and wait overlaps the transfer; results are identical. Both
    # transfers held back by an emulated link through the handles' delay() hook: one transfer each
    from parallel.link import EmulatedLink

    link = EmulatedLink(latency_us=1.0)
    h3 = dispatch_async(x, idx, w, group, E)
    h3.delay(link, 64)
    shared = x * 2.0  # "shared expert" computed while tokens travel
    r3 = h3.wait()
    c3 = combine_async(r3 * h3.recv_weights.unsqueeze(1), h3)
    c3.delay(link, 64)
    out3 = c3.wait() + shared
    assert torch.equal(out3, ref + 2.0 * x)
    assert link.transfers == 2 and link.bytes == 128
    for done in (h3, c3):
        with pytest.raises(RuntimeError, match="after wait"):
            done.delay(link, 1)

    # 7. capacity factor: pairs past an expert's capacity (token order) are dropped and counted
    cf = 0.5
    recv_c, hc = dispatch(x, idx, w, group, E, capacity_factor=cf)
    cap = math.ceil(cf * x.shape[0] * K / E)
    seen = torch.zeros(E, dtype=torch.long)
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for n in range(x.shape[0]):
        for k in range(K):
            e = int(idx[n, k])
            if e >= 0:
                seen[e] += 1
                keep[n, k] = bool(seen[e] <= cap)
    assert hc.num_dropped == int(((idx >= 0) & ~keep).sum())
    assert int(hc.dropped_per_expert.sum()) == hc.num_dropped
    out_c = combine(recv_c * hc.recv_weights.unsqueeze(1), hc)
    assert torch.equal(out_c, (w * keep).sum(1, keepdim=True) * x)
    total_dropped = torch.tensor([hc.num_dropped])
    dist.all_reduce(total_dropped, group=group)
    assert total_dropped.item() > 0, "the capacity case should drop something"

    # 8. bad input is a clear error naming the problem
    if world == 2:
        _check_bad_input(group)


def _check_moe_grads(rank: int, world: int, group, E: int) -> None:
    from parallel.expert import combine, dispatch

    g = torch.Generator().manual_seed(5)
    W = torch.randn(E, H, H, generator=g)  # expert e: y = x @ W[e]
    routes = _routing(world, seed=1)
    xs = [torch.randn(r[0].shape[0], H, generator=g) for r in routes]
    ws = [torch.rand(r[2].shape, generator=g) for r in routes]
    gs = [torch.randn(r[0].shape[0], H, generator=g) for r in routes]

    # single-process reference over every rank's tokens
    Wr = W.clone().requires_grad_()
    ref_x, ref_w, ref_out = [], [], []
    for s in range(world):
        xr, wr = xs[s].clone().requires_grad_(), ws[s].clone().requires_grad_()
        idx = routes[s][1]
        out = torch.zeros_like(xr)
        for k in range(K):
            e = idx[:, k]
            m = (e >= 0).float().unsqueeze(1)
            out = out + m * wr[:, k:k + 1] * torch.einsum("nh,nhj->nj", xr, Wr[e.clamp(min=0)])
        (out * gs[s]).sum().backward()
        ref_x.append(xr), ref_w.append(wr), ref_out.append(out.detach())

    # parallel: this rank owns experts [rank*EPR, (rank+1)*EPR)
    Wl = W[rank * EPR:(rank + 1) * EPR].clone().requires_grad_()
    x = xs[rank].clone().requires_grad_()
    wt = ws[rank].clone().requires_grad_()
    recv, h = dispatch(x, routes[rank][1], wt, group, E)
    chunks = recv.split(h.tokens_per_expert.tolist())
    if recv.shape[0]:
        y = torch.cat([c @ Wl[j] for j, c in enumerate(chunks)]) * h.recv_weights.unsqueeze(1)
    else:
        y = torch.zeros(0, H)  # an empty expert output cut off from the graph: backward must still run
    out = combine(y, h)
    torch.testing.assert_close(out, ref_out[rank], atol=1e-5, rtol=1e-5)
    (out * gs[rank]).sum().backward()
    zeros = torch.zeros_like
    torch.testing.assert_close(x.grad if x.grad is not None else zeros(x), ref_x[rank].grad,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wt.grad if wt.grad is not None else zeros(wt), ref_w[rank].grad,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Wl.grad if Wl.grad is not None else zeros(Wl),
                               Wr.grad[rank * EPR:(rank + 1) * EPR], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_dispatcher(world: int) -> None:
    run_spawn(_dispatch_worker, world)


def _check_bad_input(group) -> None:
    from parallel.expert import combine, dispatch

    x, idx, w = torch.ones(3, H), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K)
    for bad, match in [((torch.ones(3), idx, w, group, 4), "hidden"),
                       ((x, idx, w, group, 3), "not divisible"),
                       ((x, idx + 9, w, group, 4), r"\[-1, 4\)"),
                       ((x, idx, w[:, :1], group, 4), "must match"),
                       ((x, idx.float(), w, group, 4), "integer")]:
        with pytest.raises(ValueError, match=match):
            dispatch(*bad)
    recv, h = dispatch(x, idx, w, group, 4)
    with pytest.raises(ValueError, match="rows"):
        combine(recv[:1] if recv.shape[0] > 1 else torch.ones(5, H), h)
