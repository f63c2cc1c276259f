import pytest

from cluster.slurm import expand_hostlist, parse_tasks_per_node


@pytest.mark.parametrize("text,want", [
    ("node[01-04,07],gpu-a[1-2]", ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("a[008-011],b7", ["a008", "a009", "a010", "a011", "b7"]),
    ("single", ["single"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("x[3,1,2]", ["x3", "x1", "x2"]),  # order as written, never sorted
])
def test_expand_hostlist(text, want):
    assert expand_hostlist(text) == want


@pytest.mark.parametrize("bad", ["", "node[01-", "node01-04]", "node[04-01]", "node[a-b]", "n[1-2]]",
                                 "a,,b", "n[[1]]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(bad)


@pytest.mark.parametrize("text,want", [
    ("2(x2)", [2, 2]), ("2,1", [2, 1]), ("4(x2),1", [4, 4, 1]), ("8", [8]), ("1,3(x3)", [1, 3, 3, 3]),
])
def test_parse_tasks_per_node(text, want):
    assert parse_tasks_per_node(text) == want


@pytest.mark.parametrize("bad", ["", "2(x)", "x2", "2(2)", "2,,1", "-1", "2(x0)"])
def test_parse_tasks_per_node_rejects_malformed(bad):
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_tasks_per_node(bad)
