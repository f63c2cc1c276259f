"""Node-limited routing (DeepSeek-V3 report, sec. 2.1.2): each token reaches at most M nodes.

A token's node score is the sum of its best `ceil(top_k / M)` expert scores on that node; the M best
nodes are kept and the token's top-k experts are chosen among theirs. Cross-node (RDMA) traffic per token
is then bounded by M, and the all-to-all can forward within a node over NVLink.

With experts grouped per node and `n_group` = nodes, `topk_group` = M and top_k / M = 2, this is exactly
the group-limited top-k of the HF DeepseekV3 gate (group score = sum of the top-2 scores). Pure tensor
functions: the node of each EP rank comes in as a list (e.g. `[mesh.node_of(r) for r in mesh.ranks("ep")]`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def expert_nodes(rank_to_node: Sequence[int], experts_per_rank: int) -> torch.Tensor:
    """[E] compact node index (0..nodes-1, in order of first appearance) of every global expert.

    Expert e lives on EP rank e // experts_per_rank (the dispatcher's placement).
    """
    if experts_per_rank <= 0:
        raise ValueError(f"experts_per_rank must be positive, got {experts_per_rank}")
    if len(rank_to_node) == 0:
        raise ValueError("rank_to_node is empty")
    compact: dict[int, int] = {}
    per_rank = [compact.setdefault(int(n), len(compact)) for n in rank_to_node]
    return torch.tensor(per_rank, dtype=torch.long).repeat_interleave(experts_per_rank)


def node_mask(sel: torch.Tensor, top_k: int, rank_to_node: Sequence[int], experts_per_rank: int,
              max_nodes: int, per_node: int | None = None) -> torch.Tensor:
    """[N, E] bool: True for the experts on each token's `max_nodes` best nodes.

    sel: [N, E] selection scores (affinities plus any balancing bias). A node's score is the sum of its
    best `per_node` (default ceil(top_k / max_nodes)) selection scores.
    """
    if sel.dim() != 2:
        raise ValueError(f"scores must be [tokens, experts], got {tuple(sel.shape)}")
    node = expert_nodes(rank_to_node, experts_per_rank).to(sel.device)
    num_experts = sel.shape[1]
    if node.numel() != num_experts:
        raise ValueError(f"{len(rank_to_node)} ranks x {experts_per_rank} experts = {node.numel()} experts, "
                         f"but scores have {num_experts}")
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    num_nodes = int(node.max()) + 1
    max_nodes = min(max_nodes, num_nodes)
    per_node_count = torch.bincount(node, minlength=num_nodes)
    smallest = int(per_node_count.min())
    if top_k > max_nodes * smallest:
        raise ValueError(f"top_k={top_k} cannot be met from {max_nodes} node(s) of {smallest} experts")
    if per_node is None:
        per_node = math.ceil(top_k / max_nodes)
    per_node = min(per_node, smallest)
    # [nodes, max experts per node] table of expert ids, padded with E (a -inf column)
    width = int(per_node_count.max())
    table = torch.full((num_nodes, width), num_experts, dtype=torch.long, device=sel.device)
    order = torch.sort(node, stable=True).indices
    slot = torch.arange(num_experts, device=sel.device) - torch.repeat_interleave(
        torch.cumsum(per_node_count, 0) - per_node_count, per_node_count)
    table[node[order], slot] = order
    padded = torch.cat([sel, sel.new_full((sel.shape[0], 1), float("-inf"))], dim=1)
    node_score = padded[:, table].topk(per_node, dim=-1).values.sum(-1)              # [N, nodes]
    keep_nodes = node_score.topk(max_nodes, dim=-1).indices                          # [N, M]
    node_ok = torch.zeros_like(node_score, dtype=torch.bool).scatter_(1, keep_nodes, True)
    return node_ok[:, node]


def node_limited_topk(scores: torch.Tensor, top_k: int, rank_to_node: Sequence[int], experts_per_rank: int,
                      max_nodes: int, selection_bias: torch.Tensor | None = None,
                      per_node: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token restricted to its `max_nodes` best nodes.

    scores: [N, E] affinities (e.g. sigmoid of the router logits). Selection uses scores + selection_bias
    (the aux-loss-free balancing bias); the returned weights are the unbiased scores of the chosen
    experts (normalisation and scaling are the gate's business). per_node defaults to
    ceil(top_k / max_nodes). Returns (topk_idx [N, top_k] long, topk_scores [N, top_k]).
    """
    sel = scores if selection_bias is None else scores + selection_bias
    ok = node_mask(sel, top_k, rank_to_node, experts_per_rank, max_nodes, per_node)
    topk_idx = sel.masked_fill(~ok, float("-inf")).topk(top_k, dim=-1).indices
    return topk_idx, scores.gather(1, topk_idx)


class NodeLimit:
    """The gate's `expert_mask` hook for an EP group spread over several nodes (see `node_mask`)."""

    def __init__(self, rank_to_node: Sequence[int], experts_per_rank: int, max_nodes: int, top_k: int) -> None:
        self.rank_to_node, self.experts_per_rank = list(rank_to_node), experts_per_rank
        self.max_nodes, self.top_k = max_nodes, top_k

    def __call__(self, sel: torch.Tensor) -> torch.Tensor:
        return node_mask(sel, self.top_k, self.rank_to_node, self.experts_per_rank, self.max_nodes)


def nodes_per_token(topk_idx: torch.Tensor, rank_to_node: Sequence[int],
                    experts_per_rank: int) -> torch.Tensor:
    """[N] number of distinct nodes each token's experts live on (ignores -1 slots); for checks/metrics."""
    node = expert_nodes(rank_to_node, experts_per_rank).to(topk_idx.device)
    num_nodes = int(node.max()) + 1
    hit = torch.zeros(topk_idx.shape[0], num_nodes + 1, dtype=torch.bool, device=topk_idx.device)
    target = torch.where(topk_idx >= 0, node[topk_idx.clamp(min=0)], torch.full_like(topk_idx, num_nodes))
    hit.scatter_(1, target, True)
    return hit[:, :num_nodes].sum(1)
