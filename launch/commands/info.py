"""`moerun info`: each rank prints who and where it is, without needing its peers."""

from __future__ import annotations

import argparse

from launch.job import add_config_arguments, load_job_config

HELP = "print who and where every rank is (one line per rank)"
DESCRIPTION = """\
Print one line per rank: rank, world size, local rank, node index, host, the launcher whose variables
were used, the device and backend the rank would use, and its coordinates in the parallel layout.

No rendezvous happens, so `info` works even when ranks cannot reach each other: run it first when a job
does not start. Launcher precedence: torchrun > Open MPI > MPICH/Intel MPI > PMIx > Slurm (see
docs/launching.md).

examples:
  mpirun -np 4 moerun info --set parallel.tp=2
  srun -N 2 -n 8 moerun info
  moerun launch -n 4 -- info"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def describe_rank(config: dict) -> str:
    from cluster.env import RankInfo
    from cluster.layout import Layout
    from cluster.mesh import default_device_and_backend

    info = RankInfo.from_env()
    par = config["parallel"]
    layout = Layout(info.world_size, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"])
    c = layout.coords(info.rank)
    device, backend = default_device_and_backend(info)
    mesh = ",".join(f"{d}:{c[d]}/{layout.size(d)}" for d in ("pp", "dp", "tp", "ep"))
    return (
        f"rank={info.rank} world={info.world_size} local_rank={info.local_rank} "
        f"local_world={info.local_world_size} node={info.node_rank}/{info.num_nodes} host={info.hostname} "
        f"launcher={info.launcher} device={device} backend={backend} mesh={mesh}"
    )


def run(args: argparse.Namespace) -> int:
    from cluster.layout import LayoutError

    config = load_job_config(args)
    try:
        line = describe_rank(config)
    except (LayoutError, ValueError) as exc:
        raise SystemExit(f"moerun info: {exc}") from None
    print(line, flush=True)
    return 0
