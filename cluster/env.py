"""Who am I: this rank's identity, read from whichever launcher started it.

Precedence (first match wins): torchrun (`RANK`...) > Open MPI (`OMPI_COMM_WORLD_*`) > MPICH / Intel MPI
(`PMI_RANK`, `PMI_SIZE`) > PMIx (`PMIX_RANK`) > Slurm (`SLURM_PROCID`...) > a single process. Slurm's
variables are inherited by everything started inside a job step (mpirun inside sbatch hands every rank
the outer step's `SLURM_PROCID=0`), so they count only when no other launcher has spoken.

Under an MPI launcher, local rank, local size and node index come from an MPI shared-memory split
(`COMM_TYPE_SHARED`), which is right whatever the placement; `MOERUN_RANKS_PER_NODE=k` instead makes every
k consecutive ranks one node, so node-aware code can be exercised on one host.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from cluster.slurm import expand_hostlist, parse_tasks_per_node

__all__ = ["RankInfo", "mpi_comm"]


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    hostname: str
    launcher: str  # torchrun | openmpi | mpich | pmix | slurm | single

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, use_mpi: bool = True) -> RankInfo:
        """Read the launcher's variables (see module docstring); `use_mpi=False` skips the MPI split."""
        env = os.environ if env is None else env
        launcher = detect_launcher(env)
        info = _FROM_ENV[launcher](env)
        if use_mpi and launcher in ("openmpi", "mpich", "pmix"):
            info = _refine_with_mpi(info) or info
        return _apply_ranks_per_node(info, env)


def detect_launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "openmpi"
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return "mpich"
    if "PMIX_RANK" in env:
        return "pmix"
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        return "slurm"
    return "single"


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if name in env and env[name] != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
    if default is None:
        raise ValueError(f"launcher variable missing: one of {', '.join(names)} must be set")
    return default


def _host() -> str:
    return socket.gethostname()


def _check(info: RankInfo) -> RankInfo:
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"{info.launcher}: rank {info.rank} is outside world size {info.world_size}")
    if not 0 <= info.local_rank < info.local_world_size:
        raise ValueError(
            f"{info.launcher}: local rank {info.local_rank} is outside local size {info.local_world_size}"
        )
    if not 0 <= info.node_rank < info.num_nodes:
        raise ValueError(f"{info.launcher}: node {info.node_rank} is outside {info.num_nodes} nodes")
    return info


def _torchrun(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "WORLD_SIZE")
    local_size = _int(env, "LOCAL_WORLD_SIZE", default=world)
    return _check(RankInfo(
        rank=_int(env, "RANK"), world_size=world,
        local_rank=_int(env, "LOCAL_RANK", default=0), local_world_size=local_size,
        node_rank=_int(env, "GROUP_RANK", default=0),
        num_nodes=max(1, -(-world // local_size)), hostname=_host(), launcher="torchrun",
    ))


def _openmpi(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1)
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    # OMPI_COMM_WORLD_NODE_RANK is the rank among processes on the node, not the node index: the node
    # index is only known exactly from the MPI split; this rank-order guess is refined there.
    return _check(RankInfo(
        rank=rank, world_size=world,
        local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0), local_world_size=local_size,
        node_rank=min(rank // max(local_size, 1), max(1, -(-world // local_size)) - 1),
        num_nodes=max(1, -(-world // local_size)), hostname=_host(), launcher="openmpi",
    ))


def _slurm_describes_this_step(env: Mapping[str, str], rank: int, world: int) -> RankInfo | None:
    """Slurm's view when it is about these very ranks (srun --mpi=pmi2 sets PMI_* and no local-rank
    variables), not inherited from an outer step (mpiexec inside sbatch)."""
    if "SLURM_PROCID" not in env:
        return None
    try:
        s = _slurm(env)
    except ValueError:
        return None
    return s if (s.rank, s.world_size) == (rank, world) else None


def _mpich(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "PMI_SIZE")
    rank = _int(env, "PMI_RANK")
    s = None if "MPI_LOCALRANKID" in env else _slurm_describes_this_step(env, rank, world)
    if s is not None:
        return _check(RankInfo(rank, world, s.local_rank, s.local_world_size, s.node_rank, s.num_nodes,
                               _host(), "mpich"))
    local_size = _int(env, "MPI_LOCALNRANKS", default=world)
    return _check(RankInfo(
        rank=rank, world_size=world,
        local_rank=_int(env, "MPI_LOCALRANKID", default=rank % max(local_size, 1)),
        local_world_size=local_size,
        node_rank=min(rank // max(local_size, 1), max(1, -(-world // local_size)) - 1),
        num_nodes=max(1, -(-world // local_size)), hostname=_host(), launcher="mpich",
    ))


def _pmix(env: Mapping[str, str]) -> RankInfo:
    # PMIx alone names the rank; size and placement come from MPI (refined later) or Slurm's step.
    rank = _int(env, "PMIX_RANK")
    base = _slurm(env) if "SLURM_PROCID" in env else None
    world = base.world_size if base else rank + 1
    return _check(RankInfo(
        rank=rank, world_size=world,
        local_rank=base.local_rank if base else 0,
        local_world_size=base.local_world_size if base else 1,
        node_rank=base.node_rank if base else 0, num_nodes=base.num_nodes if base else 1,
        hostname=_host(), launcher="pmix",
    ))


def _slurm(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node = _int(env, "SLURM_NODEID", default=0)
    if "SLURM_STEP_TASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
        per_node = parse_tasks_per_node(
            env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"]
        )
        if node >= len(per_node):
            raise ValueError(f"slurm: SLURM_NODEID={node} but tasks-per-node lists {len(per_node)} nodes")
        local_size, num_nodes = per_node[node], len(per_node)
    else:
        local_size = world
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1)
    return _check(RankInfo(
        rank=_int(env, "SLURM_PROCID"), world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", default=0), local_world_size=local_size,
        node_rank=node, num_nodes=num_nodes, hostname=_host(), launcher="slurm",
    ))


def _single(env: Mapping[str, str]) -> RankInfo:
    return RankInfo(0, 1, 0, 1, 0, 1, _host(), "single")


_FROM_ENV = {
    "torchrun": _torchrun, "openmpi": _openmpi, "mpich": _mpich,
    "pmix": _pmix, "slurm": _slurm, "single": _single,
}


def mpi_comm():
    """COMM_WORLD from mpi4py, or None when mpi4py is missing or does not see the launcher's world.

    Only called under an MPI launcher: importing mpi4py elsewhere (plain srun without `--mpi=pmix`) would
    make every rank an MPI singleton.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _refine_with_mpi(info: RankInfo) -> RankInfo | None:
    comm = mpi_comm()
    if comm is None:
        return None
    if info.launcher != "pmix" and comm.Get_size() != info.world_size:
        return None  # mpi4py built for another MPI: it sees a singleton, not this job
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        # The node index: leaders (local rank 0) numbered in world-rank order.
        is_leader = local.Get_rank() == 0
        leaders = comm.allgather(comm.Get_rank() if is_leader else -1)
        leader_ranks = sorted(r for r in leaders if r >= 0)
        my_leader = local.bcast(comm.Get_rank() if is_leader else None, root=0)
        return _check(RankInfo(
            rank=comm.Get_rank(), world_size=comm.Get_size(),
            local_rank=local.Get_rank(), local_world_size=local.Get_size(),
            node_rank=leader_ranks.index(my_leader), num_nodes=len(leader_ranks),
            hostname=info.hostname, launcher=info.launcher,
        ))
    finally:
        local.Free()


def ranks_per_node_override(env: Mapping[str, str]) -> int | None:
    value = env.get("MOERUN_RANKS_PER_NODE", "")
    if not value:
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"MOERUN_RANKS_PER_NODE={value!r} is not an integer") from None
    if k < 1:
        raise ValueError(f"MOERUN_RANKS_PER_NODE={k} must be >= 1")
    return k


def _apply_ranks_per_node(info: RankInfo, env: Mapping[str, str]) -> RankInfo:
    k = ranks_per_node_override(env)
    if k is None:
        return info
    if info.world_size % k:
        raise ValueError(f"MOERUN_RANKS_PER_NODE={k} does not divide the world size {info.world_size}")
    return _check(RankInfo(
        rank=info.rank, world_size=info.world_size, local_rank=info.rank % k, local_world_size=k,
        node_rank=info.rank // k, num_nodes=info.world_size // k,
        hostname=info.hostname, launcher=info.launcher,
    ))


def slurm_master_host(env: Mapping[str, str]) -> str:
    """First host of the step's node list: where SLURM_NODEID 0, hence rank 0, runs."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("slurm: SLURM_STEP_NODELIST is not set; cannot find rank 0's host")
    return expand_hostlist(nodelist)[0]
