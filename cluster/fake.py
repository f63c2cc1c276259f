"""One rank of a large job on one machine: a Mesh over torch's fake process group (every collective and
point-to-point op completes at once and moves nothing), for dry runs under `FakeTensorMode`, where tensors
have shapes, dtypes and devices but no storage. `moerun dryrun` runs the real runtime code of rank R of an
N-rank job this way to count its memory.
"""

from __future__ import annotations

from cluster.env import RankInfo
from cluster.layout import Layout

__all__ = ["fake_mesh", "fake_mode_active", "is_fake", "no_fake_mode"]


def is_fake(t) -> bool:
    """Whether `t` is a fake tensor (a dry run: no values to read)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fake_mode_active() -> bool:
    """Whether code runs under a `FakeTensorMode` (a dry run): nothing is read from disk then."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def no_fake_mode():
    """A context without the active FakeTensorMode (if any): construction on the meta device makes plain
    meta tensors then, which `to_empty` turns into fake ones (modules cannot convert fake parameters)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def fake_mesh(world: int, rank: int, *, pp: int = 1, dp: int = 0, tp: int = 1, ep: int = 1,
              ranks_per_node: int = 8):
    """Rank `rank`'s Mesh of a `world`-rank job over the fake process group, `ranks_per_node` ranks per
    node. Initialises torch.distributed (backend "fake"); `mesh.close()` (or the context manager) ends it.
    Only this rank's groups are created, so 2048 ranks cost what 2 do."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from cluster.mesh import Mesh

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} ranks")
    rpn = ranks_per_node if world % ranks_per_node == 0 else None
    layout = Layout(world, pp=pp, dp=dp, tp=tp, ep=ep, ranks_per_node=rpn)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; a fake mesh needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    groups: dict = {"world": dist.group.WORLD, "control": dist.group.WORLD}
    by_members: dict[tuple[int, ...], object] = {}
    for dim in ("tp", "pp", "dp", "ep", "edp"):
        members = tuple(layout.group_of(dim, rank))
        if members not in by_members:
            by_members[members] = dist.new_group(list(members), use_local_synchronization=True)
        groups[dim] = by_members[members]
    per_node = rpn or world
    info = RankInfo(rank=rank, world_size=world, local_rank=rank % per_node, local_world_size=per_node,
                    node_rank=rank // per_node, num_nodes=world // per_node, hostname="dryrun", launcher="dryrun")
    nodes = [r // per_node for r in range(world)]
    return Mesh(info, layout, nodes, groups, torch.device("cpu"), "fake")
