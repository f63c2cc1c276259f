"""Run under mpirun by tests/test_device_discipline.py: collectives that keep the Mesh's device discipline,
then (with argument `bad`) a host tensor (made without device=) handed to a device group."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import cluster
from cluster import p2p


def main() -> int:
    with cluster.init() as mesh:
        placed = torch.ones(4, device=mesh.device)
        dist.all_reduce(placed, group=mesh.group("world"))  # placed: fine on a device group
        dist.broadcast(torch.tensor([7, 8]), 0, group=mesh.group("control"))  # host tensor on control: fine
        dist.all_reduce(torch.zeros(3).to(mesh.device), group=mesh.group("world"))  # moved explicitly: fine
        peer = 1 - mesh.rank
        ops = [p2p.Op("send", placed.clone(), peer, "x"), p2p.Op("recv", torch.empty(4, device=mesh.device),
                                                                 peer, "x")]
        for work in p2p.channel(mesh.group("world")).post(ops):
            work.wait()
        print(f"rank {mesh.rank} OK", flush=True)
        if sys.argv[1:] == ["bad"]:
            buf = torch.zeros(4)  # the bug: no device=
            dist.all_reduce(buf, group=mesh.group("world"))
        if sys.argv[1:] == ["bad-p2p"]:
            ops = [p2p.Op("send", torch.zeros(2), peer, "y"), p2p.Op("recv", torch.empty(2), peer, "y")]
            for work in p2p.channel(mesh.group("world")).post(ops):
                work.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
