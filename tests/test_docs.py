"""The docs run: what they show is what the code does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_launching_md_shows_the_script_moerun_slurm_writes(tmp_path: Path) -> None:
    """docs/launching.md's generated sbatch script, regenerated from the command written above it."""
    from launch.cli import build_parser
    from launch.commands.slurm import script_from_args

    text = (ROOT / "docs" / "launching.md").read_text()
    m = re.search(r"<!-- moerun-slurm-example: (.*?) -->\n```bash\n(.*?)```", text, re.S)
    assert m, "docs/launching.md: no moerun-slurm-example block"
    argv = shlex.split(m.group(1))
    (tmp_path / argv[0]).write_text("")  # the config file the example names (defaults are a valid job)
    args = build_parser(only="slurm").parse_args(["slurm", *argv])
    script = script_from_args(args, workdir=str(tmp_path), executable=["/home/me/moerun/.venv/bin/moerun"])
    assert script.replace(str(tmp_path), "/home/me/run") == m.group(2)
