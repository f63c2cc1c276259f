"""What every rank-side subcommand shares: config + --set parsing, joining the mesh, failing loudly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_config_arguments(parser: argparse.ArgumentParser, config_positional: bool = True) -> None:
    if config_positional:
        parser.add_argument("config", nargs="?", help="job config TOML (see docs/config.md); optional")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set parallel.tp=2 (repeatable; unknown keys are errors)",
    )


def load_job_config(args: argparse.Namespace) -> dict:
    from runtime.jobconfig import ConfigError, load_config

    try:
        return load_config(getattr(args, "config", None), args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"moerun: config error: {exc}") from None


def run_on_mesh(config: dict, body: Callable[..., int]) -> int:
    """Join the mesh of `config['parallel']`, run `body(mesh)`, and make any failure end the whole job."""
    import cluster
    from cluster.layout import LayoutError

    par = config["parallel"]
    try:
        mesh = cluster.init(tp=par["tp"], pp=par["pp"], ep=par["ep"], dp=par["dp"])
    except (LayoutError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"moerun: cannot start: {exc}") from None
    with mesh:
        code = int(body(mesh) or 0)
        if code:
            mesh.fail(f"rank {mesh.rank} ({mesh.info.hostname}) exited with status {code}")
            sys.exit(code)
    return 0
