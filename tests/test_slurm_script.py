"""Unit tests of `moerun slurm`: the generated sbatch script is parsed back and checked line by line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from launch.commands.slurm import SlurmScriptError, build_script, moerun_executable
from launch.jobcheck import JobCheckError


def parse_script(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Return (#SBATCH options as sbatch reads them, the srun argv, the script's command lines)."""
    options: dict[str, str] = {}
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    body_start = len(lines)
    for i, line in enumerate(lines[1:], start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if stripped.startswith("#SBATCH"):
                key, _, value = stripped[len("#SBATCH"):].strip().partition("=")
                assert key.startswith("--") and key not in options, line
                options[key[2:]] = value
            continue
        body_start = i  # sbatch stops reading #SBATCH lines at the first command
        break
    commands = " ".join(lines[body_start:]).replace("\\ ", " ")
    assert all(not ln.startswith("#SBATCH") for ln in lines[body_start:]), "#SBATCH after first command"
    srun_lines = [ln for ln in _join_continuations(lines[body_start:]) if ln.startswith("srun ")]
    assert len(srun_lines) == 1, commands
    return options, shlex.split(srun_lines[0]), lines[body_start:]


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in lines:
        if line.endswith("\\"):
            buf += line[:-1] + " "
        else:
            out.append((buf + line).strip())
            buf = ""
    return out


def test_defaults_one_rank_per_node_and_absolute_executable(tmp_path: Path) -> None:
    text = build_script(["selftest"], nodes=3, workdir=str(tmp_path))
    opts, srun, body = parse_script(text)
    assert opts["nodes"] == "3" and opts["ntasks-per-node"] == "1"
    assert "gpus-per-node" not in opts and "partition" not in opts and "time" not in opts
    assert "%j" in opts["output"]
    assert opts["chdir"] == str(tmp_path)
    assert opts["job-name"] == "moerun-selftest"
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--nodes=3", "--ntasks-per-node=1"]
    exe = moerun_executable()
    assert srun[4:4 + len(exe)] == exe and os.path.isabs(exe[0])
    assert srun[4 + len(exe):] == ["selftest"]
    assert "set -euo pipefail" in body


def test_ntasks_defaults_to_gpus_and_all_options(tmp_path: Path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text("[parallel]\ntp = 2\n")
    text = build_script(
        ["selftest", "--iters", "3"], nodes=2, gpus_per_node=8, partition="gpu", time="1-02:00:00",
        job_name="myjob", config="job.toml", sets=["parallel.tp=2", "train.lr=3e-4"], workdir=str(tmp_path),
        executable=["/opt/venv/bin/moerun"], account="proj-42", qos="high", cpus_per_task=12, mem="500G",
        exclusive=True, constraint="h100&ib", reservation="maint", extra=["mail-type=END,FAIL", "--requeue"],
    )
    opts, srun, body = parse_script(text)
    assert opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert opts["partition"] == "gpu" and opts["time"] == "1-02:00:00" and opts["job-name"] == "myjob"
    assert (opts["account"], opts["qos"], opts["cpus-per-task"], opts["mem"]) == ("proj-42", "high", "12", "500G")
    assert opts["exclusive"] == "" and opts["constraint"] == "h100&ib" and opts["reservation"] == "maint"
    assert opts["mail-type"] == "END,FAIL" and opts["requeue"] == ""
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): the step asks for it itself
    assert "--ntasks-per-node=8" in srun and "--cpus-per-task=12" in srun
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-12}"' in body
    tail = srun[srun.index("/opt/venv/bin/moerun") + 1:]
    # config right after the subcommand, absolute; the subcommand's own args; then --set pass-through
    assert tail == ["selftest", str(cfg), "--iters", "3", "--set", "parallel.tp=2", "--set", "train.lr=3e-4"]


def test_explicit_ntasks_beats_gpus_and_gpus_zero(tmp_path: Path) -> None:
    opts, srun, _ = parse_script(build_script(["info"], nodes=1, ntasks_per_node=4, gpus_per_node=8,
                                              workdir=str(tmp_path)))
    assert opts["ntasks-per-node"] == "4" and "--ntasks-per-node=4" in srun
    opts, _, _ = parse_script(build_script(["info"], nodes=1, gpus_per_node=0, workdir=str(tmp_path)))
    assert opts["ntasks-per-node"] == "1" and "gpus-per-node" not in opts


def test_arguments_with_spaces_are_quoted(tmp_path: Path) -> None:
    _, srun, _ = parse_script(build_script(["info", "--set", "model.path=/a b/c"], nodes=1,
                                           workdir=str(tmp_path)))
    assert srun[-1] == "model.path=/a b/c"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"nodes": None}, "--nodes is required"),
        ({"nodes": 0}, "--nodes must be >= 1"),
        ({"nodes": 1, "ntasks_per_node": 0}, "--ntasks-per-node must be >= 1"),
        ({"nodes": 1, "gpus_per_node": -1}, "--gpus-per-node must be >= 0"),
        ({"nodes": 1, "time": "two hours"}, "--time"),
        ({"nodes": 1, "time": "1:2:3:4"}, "--time"),
        ({"nodes": 1, "partition": "gpu part"}, "--partition"),
        ({"nodes": 1, "job_name": "a\nb"}, "--job-name"),
        ({"nodes": 1, "config": "missing.toml"}, "config file not found"),
        ({"nodes": 1, "sets": ["parallel.tp"]}, "KEY=VALUE"),
        ({"nodes": 1, "cpus_per_task": 0}, "--cpus-per-task must be >= 1"),
        ({"nodes": 1, "mem": "lots"}, "--mem"),
        ({"nodes": 1, "account": "my account"}, "--account"),
        ({"nodes": 1, "qos": "a'b"}, "--qos"),
        ({"nodes": 1, "constraint": "a b"}, "--constraint"),
        ({"nodes": 1, "extra": ["nodes=4"]}, "writes --nodes itself; use --nodes"),
        ({"nodes": 1, "extra": ["ntasks=4"]}, "use --nodes and --ntasks-per-node"),
        ({"nodes": 1, "extra": ["account=x"]}, "use --account"),
        ({"nodes": 1, "extra": ["mail user=x"]}, "long sbatch option"),
        ({"nodes": 1, "extra": ["-A"]}, "long sbatch option"),
        ({"nodes": 1, "extra": ["comment=a b"]}, "no spaces"),
        ({"nodes": 1, "extra": ["requeue", "requeue"]}, "given twice"),
    ],
)
def test_bad_input_names_the_problem(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(SlurmScriptError, match=needle):
        build_script(["selftest"], workdir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(("command", "needle"), [([], "no SUBCOMMAND"), (["launch"], "own mpirun"),
                                                 (["demo"], "own mpirun"),
                                                 (["slurm"], "prints a script"), (["--nodes"], "SUBCOMMAND")])
def test_bad_subcommand(tmp_path: Path, command: list[str], needle: str) -> None:
    with pytest.raises(SlurmScriptError, match=needle):
        build_script(command, nodes=1, workdir=str(tmp_path))


def test_time_formats_accepted(tmp_path: Path) -> None:
    for t in ("30", "30:00", "2:00:00", "1-12", "1-12:30", "1-12:30:00", "UNLIMITED"):
        opts, _, _ = parse_script(build_script(["info"], nodes=1, time=t, workdir=str(tmp_path)))
        assert opts["time"] == t


def test_cli_config_then_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    """CONFIG.toml first, options after it, `--`, then the subcommand: all reach the script."""
    (tmp_path / "job.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    rc = main(["slurm", "--set", "parallel.tp=2", "--account", "a", "job.toml", "--nodes", "2",
               "--ntasks-per-node", "2", "--set", "train.lr=1e-3", "--sbatch", "requeue", "--exclusive",
               "--", "selftest", "--fail-rank", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    opts, srun, _ = parse_script(out)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "2" and opts["chdir"] == str(tmp_path)
    assert opts["account"] == "a" and opts["requeue"] == "" and opts["exclusive"] == ""
    tail = srun[srun.index("selftest"):]
    cfg = str(tmp_path / "job.toml")
    assert tail == ["selftest", cfg, "--fail-rank", "1", "--set", "parallel.tp=2", "--set", "train.lr=1e-3"]


def test_cli_without_double_dash(capsys: pytest.CaptureFixture) -> None:
    assert main(["slurm", "--nodes", "1", "info", "--set", "parallel.tp=1"]) == 0
    _, srun, _ = parse_script(capsys.readouterr().out)
    assert srun[-3:] == ["info", "--set", "parallel.tp=1"]


def test_cli_bad_input_exits_nonzero_with_message(capsys: pytest.CaptureFixture) -> None:
    assert main(["slurm", "--nodes", "0", "--", "selftest"]) == 2
    err = capsys.readouterr().err
    assert "moerun slurm: error: --nodes must be >= 1" in err


def test_cli_imports_no_torch() -> None:
    """Login nodes may lack torch or a GPU: the generator must not import it."""
    code = (
        "import sys; from launch.cli import main; rc = main(['slurm', '--nodes', '1', '--', 'info']);"
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=1" in r.stdout


# --- checked as the job would check it -------------------------------------------------------------------
def _moerun_stderr(args: list[str], **env: str) -> tuple[int, str]:
    """`python -m launch ARGS` in a fresh process, without any launcher variables of this one."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_", "MOERUN_", "MASTER_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    r = subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, timeout=120,
                       env=dict(clean, OMP_NUM_THREADS="1", **env), cwd=Path(__file__).resolve().parent.parent)
    return r.returncode, r.stderr


def test_unknown_set_key_is_refused_with_the_message_train_gives(tmp_path: Path, monkeypatch, capsys) -> None:
    rc, train_err = _moerun_stderr(["train", "--set", "parallel.bogus=1"])
    assert rc != 0 and "parallel.bogus" in train_err, train_err
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "2", "--set", "parallel.bogus=1", "--", "train"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and train_err.strip() in err, (train_err, err)
    # the same key from the config file, and after `--` as the subcommand's own argument
    (tmp_path / "job.toml").write_text("[parallel]\nbogus = 1\n")
    assert main(["slurm", "job.toml", "--nodes", "2", "--", "train"]) != 0
    assert "unknown config key 'parallel.bogus'" in capsys.readouterr().err
    assert main(["slurm", "--nodes", "2", "--", "selftest", "--set", "train.nope=1"]) != 0
    assert "unknown config key 'train.nope'" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_layout_that_does_not_divide_the_tasks_is_refused_as_train_refuses_it(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    """3 ranks with pp=2: `moerun train` on rank 0 of 3 (torchrun-style variables) stops before any
    rendezvous; `moerun slurm` for 3 nodes x 1 task stops with the same line and writes nothing."""
    world3 = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    rc, train_err = _moerun_stderr(["train", "--set", "parallel.pp=2"], **world3)
    assert rc != 0 and "does not divide the world size 3" in train_err, train_err
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "3", "--set", "parallel.pp=2", "--", "train"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and train_err.strip() in err, (train_err, err)
    (tmp_path / "job.toml").write_text("[parallel]\npp = 2\n")
    assert main(["slurm", "job.toml", "--nodes", "1", "--ntasks-per-node", "3", "--", "selftest"]) != 0
    assert "does not divide the world size 3" in capsys.readouterr().err
    # 4 ranks divide: the same config is fine
    assert main(["slurm", "job.toml", "--nodes", "2", "--ntasks-per-node", "2", "--", "selftest"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out


def test_subcommand_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(JobCheckError, match=r"moerun selftest: error: unrecognized arguments: --fail-rnk"):
        build_script(["selftest", "--fail-rnk", "3"], nodes=1, workdir=str(tmp_path))
    with pytest.raises(JobCheckError, match=r"moerun client: error: unrecognized arguments: --set"):
        build_script(["client", "health"], nodes=1, sets=["parallel.tp=1"], workdir=str(tmp_path))
    # one-rank serving joins no mesh, so its layout is not the job's concern (as `moerun serve` sees it)
    build_script(["serve", "--model", "builtin:tiny"], nodes=1, sets=["parallel.pp=2"], workdir=str(tmp_path))
    with pytest.raises(JobCheckError, match="does not divide the world size 3"):
        build_script(["serve"], nodes=3, sets=["parallel.pp=2"], workdir=str(tmp_path))


def test_tp_across_nodes_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    opts, _, _ = parse_script(build_script(["info"], nodes=2, sets=["parallel.tp=2"], workdir=str(tmp_path)))
    assert opts["nodes"] == "2"
    assert "warning: tp=2 groups span nodes (1 rank(s) per node)" in capsys.readouterr().err
    build_script(["info"], nodes=2, ntasks_per_node=2, sets=["parallel.tp=2"], workdir=str(tmp_path))
    assert "warning" not in capsys.readouterr().err


def test_script_exports_the_batch_hosts_address(tmp_path: Path) -> None:
    """Rank 0's address comes from Slurm's NodeAddr of the batch host, unless MOERUN_MASTER_ADDR is set."""
    _, _, body = parse_script(build_script(["selftest"], nodes=2, workdir=str(tmp_path)))
    text = "\n".join(body)
    assert 'sinfo --noheader --Node --nodes="${SLURMD_NODENAME}" --format=%o' in text
    assert 'if [ -z "${MOERUN_MASTER_ADDR:-}" ]' in text
    assert text.index('export MOERUN_MASTER_ADDR="${MOERUN_MASTER_ADDR:-}"') < text.index("srun ")
