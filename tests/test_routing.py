"""Node-limited routing on a 4-node x 2-rank EP layout (pure tensor functions, no processes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from parallel.routing import expert_nodes, node_limited_topk, nodes_per_token

RANK_TO_NODE = [0, 0, 1, 1, 2, 2, 3, 3]  # 4 nodes x 2 ranks
EPR = 2                                   # 16 experts, 4 per node


def _brute_force(sel: torch.Tensor, top_k: int, node: torch.Tensor, max_nodes: int) -> list[set[int]]:
    """Per token: the chosen experts, by enumerating node scores directly."""
    nodes = sorted(set(node.tolist()))
    per = math.ceil(top_k / max_nodes)
    out = []
    for row in sel:
        score = {j: sorted(row[node == j].tolist(), reverse=True)[:per] for j in nodes}
        best = sorted(nodes, key=lambda j: -sum(score[j]))[:max_nodes]
        allowed = [e for e in range(len(row)) if int(node[e]) in best]
        out.append(set(sorted(allowed, key=lambda e: -float(row[e]))[:top_k]))
    return out


@pytest.mark.parametrize("max_nodes", [1, 2, 3])
def test_no_token_reaches_more_than_m_nodes(max_nodes: int) -> None:
    torch.manual_seed(0)
    scores = torch.rand(64, 16)
    bias = torch.randn(16) * 0.1
    idx, w = node_limited_topk(scores, 4, RANK_TO_NODE, EPR, max_nodes, selection_bias=bias)
    assert idx.shape == (64, 4) and w.shape == (64, 4)
    reached = nodes_per_token(idx, RANK_TO_NODE, EPR)
    assert int(reached.max()) <= max_nodes
    assert torch.equal(w, scores.gather(1, idx)), "weights must be the unbiased scores"
    assert all(len(set(r.tolist())) == 4 for r in idx), "experts must be distinct"
    node = expert_nodes(RANK_TO_NODE, EPR)
    assert [set(r.tolist()) for r in idx] == _brute_force(scores + bias, 4, node, max_nodes)


def test_all_nodes_equals_unrestricted_topk() -> None:
    torch.manual_seed(1)
    scores = torch.rand(128, 16)
    bias = torch.randn(16) * 0.05
    idx, w = node_limited_topk(scores, 6, RANK_TO_NODE, EPR, max_nodes=4, selection_bias=bias)
    ref = (scores + bias).topk(6, dim=-1).indices
    assert torch.equal(idx, ref)
    assert torch.equal(w, scores.gather(1, ref))
    # an unrestricted choice does spread over more than 2 nodes somewhere, so M=2 is a real constraint
    assert int(nodes_per_token(ref, RANK_TO_NODE, EPR).max()) > 2
    assert int(nodes_per_token(node_limited_topk(scores, 6, RANK_TO_NODE, EPR, 2)[0],
                               RANK_TO_NODE, EPR).max()) <= 2


def test_interleaved_node_map() -> None:
    """Nodes need not be contiguous in EP rank order, and node ids need not start at 0."""
    rank_to_node = [7, 3, 7, 3, 5, 9, 5, 9]
    torch.manual_seed(2)
    scores = torch.rand(32, 16)
    idx, _ = node_limited_topk(scores, 4, rank_to_node, EPR, max_nodes=2)
    assert int(nodes_per_token(idx, rank_to_node, EPR).max()) <= 2
    node = expert_nodes(rank_to_node, EPR)
    assert [set(r.tolist()) for r in idx] == _brute_force(scores, 4, node, 2)


def test_matches_hf_group_limited_topk() -> None:
    """With one group per node and top_k / M = 2 this is the DeepseekV3 HF gate's group-limited top-k."""
    torch.manual_seed(3)
    n_group, topk_group, top_k = 4, 2, 4
    scores = torch.rand(50, 16)
    bias = torch.randn(16) * 0.1
    sel = scores + bias
    group_scores = sel.view(50, n_group, -1).topk(2, dim=-1).values.sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).repeat_interleave(16 // n_group, 1)
    ref = sel.masked_fill(mask == 0, float("-inf")).topk(top_k, dim=-1).indices
    idx, _ = node_limited_topk(scores, top_k, RANK_TO_NODE, EPR, topk_group, selection_bias=bias)
    assert torch.equal(idx, ref)


def test_nodes_per_token_ignores_unused_slots() -> None:
    idx = torch.tensor([[0, 15, -1], [-1, -1, -1], [2, 3, 4]])
    assert nodes_per_token(idx, RANK_TO_NODE, EPR).tolist() == [2, 0, 2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=9, max_nodes=2), "cannot be met"),
    (dict(top_k=2, max_nodes=0), "max_nodes"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        node_limited_topk(torch.rand(3, 16), rank_to_node=RANK_TO_NODE, experts_per_rank=EPR, **kwargs)
    with pytest.raises(ValueError, match="16"):
        node_limited_topk(torch.rand(3, 12), 2, RANK_TO_NODE, EPR, 2)


def test_tie_free_layouts_all_m() -> None:
    """Every M from 1 to nodes keeps the bound on a few random draws (cheap sweep)."""
    for seed, m in itertools.product(range(3), range(1, 5)):
        torch.manual_seed(seed)
        idx, _ = node_limited_topk(torch.rand(16, 16), 4, RANK_TO_NODE, EPR, m)
        assert int(nodes_per_token(idx, RANK_TO_NODE, EPR).max()) <= m
