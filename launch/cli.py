"""The `moerun` command line: one subcommand per module in launch/commands/.

Each command module defines `HELP` (one line), `DESCRIPTION` (the --help text), `add_arguments(parser)`
and `run(args) -> int`. Modules are imported only when their subcommand runs, so `moerun --help` and the
launcher-only commands (launch, slurm, schedule, plan) start without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name -> (module, one-line help). Order is the order shown by `moerun --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("launch.commands.demo", "train builtin:tiny on 4 ranks, serve it, stream a generation"),
    "info": ("launch.commands.info", "print who and where every rank is (one line per rank)"),
    "selftest": ("launch.commands.selftest", "check and time collectives on every group of the mesh"),
    "launch": ("launch.commands.launch_local", "run a subcommand on N local ranks through mpirun"),
    "slurm": ("launch.commands.slurm", "print an sbatch script that runs a subcommand with srun"),
    "train": ("launch.commands.train", "train the model from a job config (TOML + --set)"),
    "ckpt": ("launch.commands.ckpt", "inspect checkpoints and export them to Hugging Face format"),
    "serve": ("launch.commands.serve", "serve the model over ZeroMQ (msgpack), optionally training too"),
    "client": ("launch.commands.client",
               "talk to a running server: generate, health, info, metrics, abort, save, keygen"),
    "schedule": ("launch.commands.schedule", "build and simulate a pipeline schedule (bubbles, timeline)"),
    "plan": ("launch.commands.plan", "rank parallel layouts by predicted memory and step time"),
    "dryrun": ("launch.commands.dryrun", "one rank of an N-rank training step on fake tensors: its memory"),
}

EPILOG = """\
examples:
  moerun launch -n 4 -- selftest            4 local ranks through mpirun, collectives on every group
  mpirun -np 8 moerun info --set parallel.tp=2
  moerun slurm --nodes 2 --gpus-per-node 8 -- selftest > job.sbatch && sbatch job.sbatch
  moerun schedule --kind dualpipev --pp 4 --chunks 10
Every subcommand has its own --help. Docs: docs/launching.md."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moerun",
        description="moerun: model-parallel runtime for DeepSeek-style MLA/MoE models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_line,
            description=getattr(module, "DESCRIPTION", help_line),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the subcommand being run (keeps `moerun launch` free of torch).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _announce_rank0_pid()
    return int(args._module.run(args) or 0)


def _announce_rank0_pid() -> None:
    """Under `moerun launch`, rank 0 writes its pid where the launcher can find it: a first SIGTERM / Ctrl-C
    to the launcher then goes to rank 0 alone, which stops the job gracefully (mpirun's own forwarding
    kills the ranks a moment after the signal, before a checkpoint can be written)."""
    path = os.environ.get("MOERUN_RANK0_PIDFILE")
    if not path:
        return
    from cluster.env import RankInfo

    if RankInfo.from_env(use_mpi=False).rank == 0:
        Path(path).write_text(f"{os.getpid()}\n")


if __name__ == "__main__":
    sys.exit(main())
