"""`moerun slurm`: print a commented sbatch script that runs one moerun subcommand on every rank with srun.

The script is printed, not submitted, so an operator can read and adapt it before `sbatch`. Everything a
batch job cannot rely on is pinned at generation time: the moerun executable (absolute path of this very
install), the config file (absolute path) and the working directory (`--chdir`). No torch here: this runs on
login nodes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

HELP = "print an sbatch script that runs a subcommand with srun"
DESCRIPTION = """\
Print a commented sbatch script that runs SUBCOMMAND on NODES x NTASKS_PER_NODE ranks with srun.

  moerun slurm [CONFIG.toml] --nodes N [--ntasks-per-node K] [--gpus-per-node G] [--cpus-per-task C]
               [--mem M] [--exclusive] [--partition P] [--account A] [--qos Q] [--time T]
               [--constraint F] [--reservation R] [--sbatch OPTION[=VALUE] ...] [--job-name J]
               [--output PATTERN] [--set key=value ...] [--] SUBCOMMAND [ARGS ...]

K (ranks per node) defaults to G (one rank per GPU), and to 1 when neither is given. CONFIG.toml, when
given, is passed to SUBCOMMAND as its first argument, as an absolute path; --set pairs are passed to
SUBCOMMAND as they are. Before writing anything, SUBCOMMAND's arguments, the job config and the layout
(parallel.tp/pp/ep/dp against N x K ranks) are checked as the job's ranks would check them: a job they
would refuse is refused now, with their message, instead of after its wait in the queue.

The #SBATCH options above become #SBATCH lines as they are; --sbatch passes any other one (repeatable, e.g.
--sbatch mail-type=END --sbatch requeue). The job's output goes to PATTERN (default %x-%j.out: job name and
job id) in the directory where this command ran. Each rank finds its peers from Slurm's variables (no MPI
needed) and meets rank 0 at the address Slurm has for the batch host (its NodeAddr; node names need not
resolve); see docs/launching.md.

examples:
  moerun slurm --nodes 2 --gpus-per-node 8 -- selftest > selftest.sbatch && sbatch selftest.sbatch
  moerun slurm job.toml --nodes 4 --gpus-per-node 8 --partition gpu --account proj --time 2:00:00 -- train
  moerun slurm --nodes 2 --ntasks-per-node 2 --set parallel.tp=2 -- info
"""

# Subcommands that start ranks themselves: running them on every rank of an srun step would nest launchers.
NOT_PER_RANK = {"slurm": "prints a script", "launch": "starts its own mpirun", "demo": "starts its own mpirun",
                "schedule": "runs on one process", "plan": "runs on one process"}

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; and UNLIMITED / INFINITE.
_TIME_RE = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,:+@%=-]+$")  # what we accept in #SBATCH values (no spaces, no quotes)
_FREE_RE = re.compile(r"^[^\s'\"\\]+$")  # --constraint / --sbatch values: features use & | [ ] * too
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_OPTION_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# #SBATCH options the script writes itself or that change the task count: not for --sbatch.
_OWN_OPTIONS = {"nodes": "--nodes", "ntasks-per-node": "--ntasks-per-node", "ntasks": "--nodes and --ntasks-per-node",
                "chdir": "the directory you run moerun slurm in", "output": "--output", "job-name": "--job-name",
                "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task", "mem": "--mem",
                "exclusive": "--exclusive", "partition": "--partition", "account": "--account", "qos": "--qos",
                "time": "--time", "constraint": "--constraint", "reservation": "--reservation"}


class SlurmScriptError(ValueError):
    """Bad input for the sbatch script; the message names the option and what is wrong."""


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", "-N", type=int, default=None, metavar="N",
                        help="number of nodes (required)")
    parser.add_argument("--ntasks-per-node", type=int, default=None, metavar="K",
                        help="ranks per node (default: --gpus-per-node, else 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                        help="GPUs to request per node")
    parser.add_argument("--cpus-per-task", "-c", type=int, default=None, metavar="C",
                        help="CPU cores per rank (also given to srun, and OMP_NUM_THREADS' default)")
    parser.add_argument("--mem", default=None, metavar="M", help="memory per node, e.g. 500G (0: all of it)")
    parser.add_argument("--exclusive", action="store_const", const=True, default=None,
                        help="whole nodes, shared with no other job")
    parser.add_argument("--partition", "-p", default=None, metavar="P", help="Slurm partition")
    parser.add_argument("--account", "-A", default=None, metavar="A", help="account charged for the job")
    parser.add_argument("--qos", "-q", default=None, metavar="Q", help="quality of service")
    parser.add_argument("--time", "-t", default=None, metavar="T", help="time limit, e.g. 30, 2:00:00, 1-12")
    parser.add_argument("--constraint", "-C", default=None, metavar="F", help="node features, e.g. h100&ib")
    parser.add_argument("--reservation", default=None, metavar="R", help="run in this reservation")
    parser.add_argument("--sbatch", dest="extra", action="append", default=None, metavar="OPTION[=VALUE]",
                        help="any other #SBATCH option, without its dashes (repeatable): "
                             "--sbatch mail-type=END --sbatch requeue")
    parser.add_argument("--job-name", "-J", default=None, metavar="J",
                        help="job name (default: moerun-SUBCOMMAND)")
    parser.add_argument("--output", "-o", default=None, metavar="PATTERN",
                        help="output file pattern (default: %%x-%%j.out, i.e. job name and job id)")
    parser.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE",
                        help="passed on to SUBCOMMAND as --set KEY=VALUE (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_options(parser)
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG.toml] [--] SUBCOMMAND ...",
                        help="optional config file, then the moerun subcommand each rank runs")


def _split_rest(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Separate CONFIG.toml, options that follow it, and the subcommand (argparse's REMAINDER takes all)."""
    rest = list(args.rest or [])
    config = None
    if rest and rest[0] != "--" and rest[0].endswith(".toml"):
        config = rest.pop(0)
        later = argparse.ArgumentParser(prog="moerun slurm CONFIG.toml", add_help=False)
        _add_options(later)
        later.add_argument("rest", nargs=argparse.REMAINDER)
        more = later.parse_args(rest)
        for key, value in vars(more).items():
            if key in ("sets", "extra") and value:
                setattr(args, key, (getattr(args, key) or []) + value)
            elif key != "rest" and value is not None:
                setattr(args, key, value)
        rest = list(more.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return config, rest


def moerun_executable() -> list[str]:
    """Absolute argv prefix that runs this same moerun install on the compute nodes."""
    # Not resolved: a venv's python is a symlink, and resolving it would escape the venv.
    py = Path(os.path.abspath(sys.executable))
    script = py.parent / "moerun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(py), "-m", "launch"]


def _check_value(option: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise SlurmScriptError(f"{option} {value!r}: use letters, digits and _.,:+@%=- only (no spaces)")
    return value


def _extra_options(items: list[str]) -> list[str]:
    """`--sbatch OPTION[=VALUE]` items -> `--OPTION[=VALUE]`, checked: one word, not an option of our own."""
    out: dict[str, str] = {}
    for item in items:
        option, eq, value = item.lstrip("-").partition("=")
        if not _OPTION_RE.match(option):
            raise SlurmScriptError(f"--sbatch {item!r}: expected OPTION or OPTION=VALUE with a long sbatch option "
                                   "name, e.g. mail-type=END or requeue")
        if option in _OWN_OPTIONS:
            raise SlurmScriptError(f"--sbatch {item!r}: the script writes --{option} itself; "
                                   f"use {_OWN_OPTIONS[option]}")
        if eq and not _FREE_RE.match(value):
            raise SlurmScriptError(f"--sbatch {item!r}: the value may hold no spaces, quotes or backslashes")
        if option in out:
            raise SlurmScriptError(f"--sbatch {option} given twice ({out[option]!r} and {item!r})")
        out[option] = f"--{option}={value}" if eq else f"--{option}"
    return list(out.values())


def build_script(
    command: list[str],
    *,
    nodes: int | None,
    ntasks_per_node: int | None = None,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    exclusive: bool | None = None,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    time: str | None = None,
    constraint: str | None = None,
    reservation: str | None = None,
    extra: list[str] | None = None,
    job_name: str | None = None,
    output: str | None = None,
    config: str | None = None,
    sets: list[str] | None = None,
    workdir: str | None = None,
    executable: list[str] | None = None,
) -> str:
    """Return the sbatch script text; raise SlurmScriptError naming the bad option on bad input, and
    launch.jobcheck.JobCheckError with the ranks' own message where the job would stop at once."""
    from launch.cli import COMMANDS  # no torch: the registry imports command modules lazily
    from launch.jobcheck import check_job

    if nodes is None:
        raise SlurmScriptError("--nodes is required (how many nodes the job spans)")
    if nodes < 1:
        raise SlurmScriptError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node is not None and gpus_per_node < 0:
        raise SlurmScriptError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if ntasks_per_node is None:
        ntasks_per_node = gpus_per_node if gpus_per_node else 1
    if ntasks_per_node < 1:
        raise SlurmScriptError(f"--ntasks-per-node must be >= 1, got {ntasks_per_node}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise SlurmScriptError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
    if mem is not None and not _MEM_RE.match(mem):
        raise SlurmScriptError(f"--mem {mem!r}: use a number of megabytes or one with a unit, e.g. 500G, 64000M")
    if not command:
        raise SlurmScriptError("no SUBCOMMAND given: e.g. `moerun slurm --nodes 2 -- selftest`")
    sub = command[0]
    if sub.startswith("-") or not sub.strip():
        raise SlurmScriptError(f"SUBCOMMAND expected before its options, got {sub!r}: e.g. `-- selftest -h`")
    if sub in NOT_PER_RANK:
        raise SlurmScriptError(f"SUBCOMMAND {sub!r} {NOT_PER_RANK[sub]}: it cannot run on every rank")
    if time is not None and not _TIME_RE.match(time):
        raise SlurmScriptError(f"--time {time!r}: use minutes, H:M:S, D-H, D-H:M:S or UNLIMITED")
    for opt, val in (("--partition", partition), ("--account", account), ("--qos", qos),
                     ("--reservation", reservation), ("--job-name", job_name), ("--output", output)):
        if val is not None:
            _check_value(opt, val)
    if constraint is not None and not _FREE_RE.match(constraint):
        raise SlurmScriptError(f"--constraint {constraint!r}: no spaces, quotes or backslashes")
    extra_lines = _extra_options(extra or [])
    for kv in sets or []:
        if "=" not in kv or kv.startswith("="):
            raise SlurmScriptError(f"--set {kv!r}: expected KEY=VALUE, e.g. parallel.tp=2")

    workdir = os.path.abspath(workdir or os.getcwd())
    job_name = job_name or f"moerun-{sub}"
    output = output or "%x-%j.out"
    exe = executable or moerun_executable()
    args = [sub]
    if config is not None:
        cpath = Path(config)
        cpath = cpath if cpath.is_absolute() else Path(workdir) / cpath
        if not cpath.is_file():
            raise SlurmScriptError(f"config file not found: {config} (looked at {cpath})")
        args.append(str(cpath))
    args += command[1:]
    for kv in sets or []:
        args += ["--set", kv]
    ranks = nodes * ntasks_per_node
    if sub not in COMMANDS:
        # Warn only: the script may be meant for a newer moerun on the cluster than this one.
        print(f"moerun slurm: warning: {sub!r} is not a subcommand of this moerun ({', '.join(COMMANDS)}); "
              "writing the script anyway, unchecked", file=sys.stderr)
    for warning in check_job(args, ranks, ntasks_per_node):
        print(f"moerun slurm: warning: {warning}", file=sys.stderr)
    argv = [*exe, *args]
    rank_note = f"{ntasks_per_node} rank(s) per node"
    if gpus_per_node:
        rank_note += f", {gpus_per_node} GPU(s) per node: rank's device = its local rank"

    lines = [
        "#!/bin/bash",
        f"# sbatch script written by `moerun slurm` for: moerun {shlex.join(command)}",
        f"# {nodes} node(s) x {ntasks_per_node} = {ranks} rank(s). Submit with: sbatch THIS_FILE",
        "# (sbatch reads #SBATCH lines up to the first command; comment lines between them are fine.)",
        "#",
        "# Job name, shown by squeue and used as %x in the output file name.",
        f"#SBATCH --job-name={job_name}",
        "# Nodes, and one task (rank) per slot: " + rank_note + ".",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={ntasks_per_node}",
    ]
    if gpus_per_node:
        lines += [
            "# GPUs per node. Every rank sees all of its node's GPUs and takes cuda:<local rank>.",
            f"#SBATCH --gpus-per-node={gpus_per_node}",
        ]
    if cpus_per_task:
        lines += ["# CPU cores per rank (srun below is given them too: it does not inherit them from sbatch).",
                  f"#SBATCH --cpus-per-task={cpus_per_task}"]
    if mem is not None:
        lines += ["# Memory per node (0: all of it).", f"#SBATCH --mem={mem}"]
    if exclusive:
        lines += ["# Whole nodes: no other job shares them.", "#SBATCH --exclusive"]
    for comment, option, value in (("Partition (queue).", "partition", partition),
                                   ("Account charged for the job.", "account", account),
                                   ("Quality of service.", "qos", qos),
                                   ("Reservation to run in.", "reservation", reservation),
                                   ("Node features the job needs.", "constraint", constraint)):
        if value:
            lines += [f"# {comment}", f"#SBATCH --{option}={value}"]
    if time:
        lines += ["# Wall-clock limit; Slurm sends SIGTERM, then SIGKILL, when it runs out.",
                  f"#SBATCH --time={time}"]
    if extra_lines:
        lines += ["# Passed through with --sbatch."] + [f"#SBATCH {line}" for line in extra_lines]
    threads = cpus_per_task or 1
    srun_opts = f"--kill-on-bad-exit=1 --nodes={nodes} --ntasks-per-node={ntasks_per_node}"
    if cpus_per_task:
        srun_opts += f" --cpus-per-task={cpus_per_task}"
    lines += [
        "# Working directory of the job: where `moerun slurm` ran (relative paths in configs resolve here).",
        f"#SBATCH --chdir={workdir}",
        "# stdout+stderr of every rank, one file per job: %x = job name, %j = job id.",
        f"#SBATCH --output={output}",
        "",
        "set -euo pipefail",
        "",
        "# One line for the log: which job, which nodes.",
        'echo "moerun: job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES} node(s): ${SLURM_JOB_NODELIST}"',
        "",
        f"# {threads} CPU thread(s) per rank unless the environment says otherwise (ranks share the node's "
        "cores).",
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{threads}}}"',
        "",
        "# Rank 0 runs on this node: sbatch runs this script on the first node of the allocation, and srun",
        "# puts SLURM_NODEID 0 there. Node names need not resolve from the other nodes, so the ranks meet",
        "# rank 0 at the address Slurm itself has for this node (its NodeAddr, from sinfo). A",
        "# MOERUN_MASTER_ADDR set before sbatch (e.g. a fabric address) wins; with no address the ranks",
        "# use the first node's name.",
        'if [ -z "${MOERUN_MASTER_ADDR:-}" ] && [ -n "${SLURMD_NODENAME:-}" ]; then',
        '    MOERUN_MASTER_ADDR="$(sinfo --noheader --Node --nodes="${SLURMD_NODENAME}" --format=%o 2>/dev/null'
        ' | head -n 1 || true)"',
        "fi",
        'export MOERUN_MASTER_ADDR="${MOERUN_MASTER_ADDR:-}"',
        'echo "moerun: rank 0 on ${SLURMD_NODENAME:-?}, rendezvous address ${MOERUN_MASTER_ADDR:-(its name)}"',
        "",
        "# One srun step runs every rank. Each rank reads SLURM_PROCID / SLURM_NTASKS / SLURM_NODEID",
        "# and meets rank 0 at MOERUN_MASTER_ADDR (else the first node of SLURM_STEP_NODELIST), at a",
        "# port derived from the job and step ids, so no MPI wire-up is needed.",
        "# --kill-on-bad-exit=1: when any rank exits non-zero, Slurm kills the whole step and the job fails.",
        "# The executable is this install of moerun, by absolute path.",
        f"srun {srun_opts} \\",
        f"    {shlex.join(argv)}",
        "",
    ]
    return "\n".join(lines)


def script_from_args(args: argparse.Namespace, workdir: str | None = None,
                     executable: list[str] | None = None) -> str:
    """The script for parsed `moerun slurm` arguments (what `run` prints); errors as build_script's."""
    config, command = _split_rest(args)
    return build_script(
        command,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        exclusive=args.exclusive,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        constraint=args.constraint,
        reservation=args.reservation,
        extra=args.extra,
        job_name=args.job_name,
        output=args.output,
        config=config,
        sets=args.sets,
        workdir=workdir,
        executable=executable,
    )


def run(args: argparse.Namespace) -> int:
    from launch.jobcheck import JobCheckError

    try:
        text = script_from_args(args)
    except SlurmScriptError as e:
        print(f"moerun slurm: error: {e}", file=sys.stderr)
        return 2
    except JobCheckError as e:
        print(e, file=sys.stderr)
        print("moerun slurm: no script written: every rank of this job would stop with the error above",
              file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
