"""cluster: who am I, where are my peers, and the Mesh of process groups.

Importing this package does not import torch; `init()` does.
"""

from cluster.env import RankInfo
from cluster.groups import group_rank, group_size
from cluster.layout import DIMS, Layout, LayoutError

__all__ = ["DIMS", "Layout", "LayoutError", "Mesh", "RankInfo", "group_rank", "group_size", "init"]


def init(tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 0, **kwargs):
    """Read the launcher's environment, initialise torch.distributed and return this rank's Mesh."""
    from cluster.mesh import init as _init

    return _init(tp=tp, pp=pp, ep=ep, dp=dp, **kwargs)


def __getattr__(name: str):
    if name == "Mesh":
        from cluster.mesh import Mesh

        return Mesh
    raise AttributeError(name)
