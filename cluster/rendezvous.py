"""Find the peers: a torch TCPStore that every rank of this job, and no other job, reaches.

Never a fixed port. In order of preference:
  1. `MASTER_ADDR`/`MASTER_PORT` given by the launcher (torchrun) or the user: use them as given.
  2. An MPI launcher with mpi4py: rank 0 binds port 0 (the OS picks a free one) and broadcasts
     (address, port) over MPI.
  3. Plain `srun` (no MPI wire-up): rank 0's host is `MOERUN_MASTER_ADDR` (the scripts of `moerun slurm`
     export the batch host's address there), else the first host of `SLURM_STEP_NODELIST`, and the port is
     derived from the job and step ids:
         port = 15000 + (SLURM_JOB_ID * 1009 + SLURM_STEP_ID) % 10000
     Two steps of one job, and neighbouring jobs, get different ports; a store that answers but belongs to
     another job is detected by a job token and is a clear error, never a silent join.
An address that does not resolve is an immediate error, not a retry loop.

The store listens only on the interface that reaches rank 0's advertised address (`MASTER_ADDR`, the
address broadcast over MPI, ...): loopback for a job on one host, so nothing off the host can reach it.
Only when that address is not one of this host's (a NAT, or a name that resolves to loopback here while
the job spans hosts) does it listen on every interface, with a warning. The store has no authentication:
what the health watchdog writes there is signed with a secret that never goes through it (cluster/health.py).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from cluster.env import RankInfo, mpi_comm, slurm_master_host

__all__ = ["RendezvousError", "Endpoint", "rendezvous", "slurm_port", "connect_store", "store_bind_address"]

JOB_KEY = "moerun/job"


class RendezvousError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int
    source: str  # env | mpi | slurm | single
    job_token: str
    agent_hosts_store: bool = False  # torchrun's agent already runs the store: every rank is a client


def slurm_port(env: Mapping[str, str]) -> int:
    try:
        job = int(env["SLURM_JOB_ID"])
    except (KeyError, ValueError):
        raise RendezvousError("slurm: SLURM_JOB_ID is missing or not a number; set MASTER_PORT") from None
    step = int(env.get("SLURM_STEP_ID", "0") or 0)
    return 15000 + (job * 1009 + step) % 10000


def check_resolves(addr: str, what: str) -> None:
    try:
        socket.getaddrinfo(addr, None)
    except socket.gaierror as exc:
        raise RendezvousError(
            f"{what} {addr!r} does not resolve ({exc.strerror}); set MOERUN_MASTER_ADDR or MASTER_ADDR "
            f"to an address every rank can reach"
        ) from None


def _advertised_address(info: RankInfo, env: Mapping[str, str]) -> str:
    if env.get("MOERUN_MASTER_ADDR"):
        return env["MOERUN_MASTER_ADDR"]
    if info.num_nodes == 1:
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def find_endpoint(info: RankInfo, env: Mapping[str, str] | None = None) -> Endpoint:
    """Decide where the store lives; collective under MPI (every rank must call it)."""
    env = os.environ if env is None else env
    if info.world_size == 1:
        return Endpoint("127.0.0.1", 0, "single", "single")
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        addr = env["MASTER_ADDR"]
        check_resolves(addr, "MASTER_ADDR")
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        token = env.get("TORCHELASTIC_RUN_ID", "env")
        return Endpoint(addr, int(env["MASTER_PORT"]), "env", token, agent)
    if info.launcher in ("openmpi", "mpich", "pmix"):
        comm = mpi_comm()
        if comm is not None and comm.Get_size() == info.world_size:
            return Endpoint("", 0, "mpi", "")  # filled in by rendezvous(): rank 0 binds first
    if info.launcher == "slurm" or "SLURM_JOB_ID" in env:
        if env.get("MOERUN_MASTER_ADDR"):
            addr, what = env["MOERUN_MASTER_ADDR"], "MOERUN_MASTER_ADDR"
        else:
            addr, what = slurm_master_host(env), "rank 0's host (first of SLURM_STEP_NODELIST)"
        check_resolves(addr, what)
        token = f"slurm-{env.get('SLURM_JOB_ID')}.{env.get('SLURM_STEP_ID', '0')}"
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(env)
        return Endpoint(addr, port, "slurm", token)
    raise RendezvousError(
        f"cannot find rank 0: launcher {info.launcher!r} gave no MASTER_ADDR/MASTER_PORT and mpi4py does "
        f"not see this job's {info.world_size} ranks; set MASTER_ADDR and MASTER_PORT"
    )


def store_bind_address(addr: str, num_nodes: int) -> tuple[str, str | None]:
    """(the IP the store should listen on, None), or ("", why) when it must listen on every interface."""
    try:
        ip = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return "", f"{addr!r} does not resolve here"
    if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
        if num_nodes == 1:
            return ip, None
        return "", f"{addr} is loopback ({ip}) on this host but the job spans {num_nodes} hosts"
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return "", f"{addr} ({ip}) is not an address of this host"
    return ip, None


def _master_store(addr: str, port: int, num_nodes: int, timeout: timedelta):
    """The store on rank 0, listening where `store_bind_address` says (port 0: a free port)."""
    from torch.distributed import TCPStore

    ip, why = store_bind_address(addr, num_nodes)
    if not ip:
        sys.stderr.write(f"[moerun] warning: the rendezvous store listens on every interface because {why}; "
                         f"whoever reaches its port can disrupt the job (not stop it: the watchdog's records are "
                         f"signed); keep that network private\n")
        return TCPStore("0.0.0.0", port, world_size=None, is_master=True, timeout=timeout, wait_for_workers=False)
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(4096)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    # the store owns the listening socket from here on (closing it is the store's job)
    return TCPStore(ip, port, world_size=None, is_master=True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=sock.detach())


def connect_store(addr: str, port: int, timeout_s: float):
    """A client connection to an existing store (used by the health watchdog, one per rank)."""
    from torch.distributed import TCPStore

    return TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                    wait_for_workers=False)


def _bcast_endpoint(comm, ep: Endpoint | None) -> Endpoint:
    """Share rank 0's endpoint as a plain byte buffer (no pickling, even between our own ranks)."""
    buf = bytearray(512)
    if ep is not None:
        text = f"{ep.addr}|{ep.port}|{ep.job_token}".encode()
        buf[: len(text)] = text
    from mpi4py import MPI

    comm.Bcast([buf, MPI.BYTE], root=0)
    addr, port, token = bytes(buf).rstrip(b"\0").decode().split("|")
    return Endpoint(addr, int(port), "mpi", token)


def rendezvous(info: RankInfo, timeout_s: float, env: Mapping[str, str] | None = None):
    """Return (store, endpoint) for this rank; rank 0 hosts the store unless torchrun's agent does."""
    from torch.distributed import HashStore, TCPStore

    env = os.environ if env is None else env
    ep = find_endpoint(info, env)
    timeout = timedelta(seconds=timeout_s)
    if ep.source == "single":
        return HashStore(), ep
    if ep.source == "mpi":
        comm = mpi_comm()
        store = None
        if info.rank == 0:
            addr = _advertised_address(info, env)
            store = _master_store(addr, 0, info.num_nodes, timeout)
            ep = Endpoint(addr, store.port, "mpi", uuid.uuid4().hex)
            store.set(JOB_KEY, ep.job_token)
        ep = _bcast_endpoint(comm, ep if info.rank == 0 else None)
        if store is None:
            store = TCPStore(ep.addr, ep.port, is_master=False, timeout=timeout, wait_for_workers=False)
        return store, ep
    is_master = info.rank == 0 and not ep.agent_hosts_store
    try:
        if is_master:
            store = _master_store(ep.addr, ep.port, info.num_nodes, timeout)
        else:
            store = TCPStore(ep.addr, ep.port, is_master=False, timeout=timeout, wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several types; all mean the same here
        role = "bind" if is_master else "reach"
        raise RendezvousError(
            f"rank {info.rank}: cannot {role} the rendezvous store at {ep.addr}:{ep.port} "
            f"({ep.source}): {exc}"
        ) from None
    if ep.source == "slurm":
        if is_master:
            store.set(JOB_KEY, ep.job_token)
        else:
            found = store.get(JOB_KEY).decode()
            if found != ep.job_token:
                raise RendezvousError(
                    f"rank {info.rank}: the store at {ep.addr}:{ep.port} belongs to {found!r}, not "
                    f"{ep.job_token!r}; another job holds this port, set MASTER_PORT"
                )
    return store, ep
