"""Check a rank-side subcommand as its job would, before any rank starts.

`moerun slurm` writes a script that waits in a queue; a job that every rank would refuse at once (an unknown
`--set` key, a layout that does not divide the task count, a misspelt option) must be refused before it is
queued, with the very message the ranks would print. So the check runs the job's own code: the subcommand's
argument parser, `launch.job.load_job_config`, and `cluster.layout.Layout` for the world the script asks for,
as `cluster.init` builds it. No torch here: this runs on login nodes.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["JobCheckError", "check_job"]


class JobCheckError(ValueError):
    """The job would stop at once; the message is what its ranks would print."""


class _RaisingParser(argparse.ArgumentParser):
    """The subcommand's parser, raising instead of printing usage and exiting."""

    def error(self, message: str):
        raise JobCheckError(f"{self.prog}: error: {message}")


def check_job(argv: list[str], ranks: int, ranks_per_node: int) -> list[str]:
    """Check `moerun ARGV` started on `ranks` ranks, `ranks_per_node` per node, as its ranks would.

    Returns warnings (the job would run, but not as well as it could); raises JobCheckError with the ranks'
    own message where the job would stop. A subcommand this moerun does not know is not checked.
    """
    from cluster.layout import Layout, LayoutError
    from launch.cli import COMMANDS
    from launch.job import load_job_config

    sub, rest = argv[0], list(argv[1:])
    if sub not in COMMANDS:
        return []
    parser = _RaisingParser(prog=f"moerun {sub}", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")  # help on every rank is odd, but not an error
    importlib.import_module(COMMANDS[sub][0]).add_arguments(parser)
    args = parser.parse_args(rest)
    if not hasattr(args, "overrides"):  # the subcommand takes no job config
        return []
    try:
        config = load_job_config(args)
    except SystemExit as exc:  # load_job_config stops the job with the message every rank prints
        raise JobCheckError(str(exc)) from None
    if sub == "serve" and ranks == 1:  # one-rank serving joins no mesh (launch/commands/serve.py)
        return []
    par = config["parallel"]
    prefix = "moerun info" if sub == "info" else "moerun: cannot start"  # info.run / launch.job.run_on_mesh
    try:
        Layout(ranks, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"])  # as cluster.init checks it
        layout = Layout(ranks, pp=par["pp"], dp=par["dp"], tp=par["tp"], ep=par["ep"],
                        ranks_per_node=ranks_per_node)
    except LayoutError as exc:
        raise JobCheckError(f"{prefix}: {exc}") from None
    warnings = []
    if any(layout.node_of(g[0]) != layout.node_of(g[-1]) for g in layout.groups("tp")):
        warnings.append(f"tp={layout.tp} groups span nodes ({ranks_per_node} rank(s) per node); TP traffic "
                        "will cross the network")
    return warnings
