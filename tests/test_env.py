"""RankInfo from each launcher's variables, and the precedence between launchers."""

import pytest

from cluster.env import RankInfo, detect_launcher
from cluster.rendezvous import RendezvousError, find_endpoint, slurm_port

SLURM_INHERITED = {  # what mpirun inside an sbatch step hands every rank
    "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n1",
}


def info(env):
    return RankInfo.from_env(env, use_mpi=False)


def test_single_process():
    i = info({})
    assert (i.rank, i.world_size, i.local_rank, i.node_rank, i.num_nodes, i.launcher) == (0, 1, 0, 0, 1, "single")


def test_torchrun_beats_everything():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", **SLURM_INHERITED}
    i = info(env)
    assert (i.launcher, i.rank, i.world_size, i.local_rank, i.local_world_size, i.node_rank, i.num_nodes) == \
        ("torchrun", 5, 8, 1, 4, 1, 2)


def test_openmpi_beats_inherited_slurm():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "3", **SLURM_INHERITED}
    i = info(env)
    assert (i.launcher, i.rank, i.world_size, i.local_rank) == ("openmpi", 3, 4, 3)


def test_mpich_beats_inherited_slurm():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", **SLURM_INHERITED}
    i = info(env)
    assert (i.launcher, i.rank, i.world_size, i.local_rank, i.local_world_size, i.node_rank) == \
        ("mpich", 2, 4, 0, 2, 1)


def test_pmix_takes_size_from_slurm_step():
    env = {"PMIX_RANK": "3", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    i = info(env)
    assert (i.launcher, i.rank, i.world_size, i.local_rank, i.local_world_size, i.node_rank, i.num_nodes) == \
        ("pmix", 3, 4, 1, 2, 1, 2)


def test_slurm_alone():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "2,1"}
    i = info(env)
    assert (i.launcher, i.rank, i.world_size, i.local_rank, i.local_world_size, i.node_rank, i.num_nodes) == \
        ("slurm", 2, 3, 0, 1, 1, 2)


def test_ranks_per_node_override():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MOERUN_RANKS_PER_NODE": "2"}
    i = info(env)
    assert (i.local_rank, i.local_world_size, i.node_rank, i.num_nodes) == (1, 2, 2, 4)


@pytest.mark.parametrize("env,match", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "not an integer"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "MOERUN_RANKS_PER_NODE": "3"}, "does not divide"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
     "tasks-per-node lists 2 nodes"),
])
def test_bad_launcher_values_are_clear_errors(env, match):
    with pytest.raises(ValueError, match=match):
        info(env)


def test_detect_launcher_ignores_partial_torchrun():
    assert detect_launcher({"RANK": "0"}) == "single"


def test_slurm_port_differs_between_steps_and_jobs():
    a = slurm_port({"SLURM_JOB_ID": "1000", "SLURM_STEP_ID": "0"})
    b = slurm_port({"SLURM_JOB_ID": "1000", "SLURM_STEP_ID": "1"})
    c = slurm_port({"SLURM_JOB_ID": "1001", "SLURM_STEP_ID": "0"})
    assert len({a, b, c}) == 3 and all(15000 <= p < 25000 for p in (a, b, c))
    # jobs close in id never meet for steps below 1009
    ports = {slurm_port({"SLURM_JOB_ID": str(j), "SLURM_STEP_ID": str(s)}) for j in range(5) for s in range(50)}
    assert len(ports) == 250


def test_unresolvable_master_is_immediate_error():
    i = RankInfo(1, 2, 1, 2, 0, 1, "h", "torchrun")
    with pytest.raises(RendezvousError, match="does not resolve"):
        find_endpoint(i, {"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "1234"})


def test_slurm_endpoint_is_first_host_of_step():
    i = RankInfo(1, 4, 1, 2, 0, 2, "h", "slurm")
    ep = find_endpoint(i, {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", "SLURM_STEP_NODELIST": "localhost,n2"})
    assert (ep.addr, ep.port, ep.source) == ("localhost", slurm_port({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}),
                                             "slurm")
    assert ep.job_token == "slurm-42.3"


def test_no_way_to_rendezvous_is_clear_error(monkeypatch):
    monkeypatch.setattr("cluster.rendezvous.mpi_comm", lambda: None)  # as if mpi4py were missing
    i = RankInfo(1, 4, 1, 4, 0, 1, "h", "mpich")
    with pytest.raises(RendezvousError, match="MASTER_ADDR"):
        find_endpoint(i, {})


def test_srun_pmi2_placement_comes_from_the_same_steps_slurm_variables():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    i = info(env)
    assert (i.launcher, i.local_rank, i.local_world_size, i.node_rank, i.num_nodes) == ("mpich", 1, 2, 1, 2)
