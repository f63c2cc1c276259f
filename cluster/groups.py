"""Size and rank of a process group, where None stands for "no group": one process, size 1, rank 0.

Every layer that takes an optional group (TP, EP, DP, the optimizer, checkpoints) asks these two."""

from __future__ import annotations

__all__ = ["group_rank", "group_size"]


def group_size(group) -> int:
    """Members of `group` (1 for None)."""
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group` (0 for None)."""
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)
