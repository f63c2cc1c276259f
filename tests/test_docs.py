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


# --- every fenced block of the docs and the README ---------------------------------------------------------
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)


def blocks(lang: str | None = None) -> list[tuple[str, int, str, str]]:
    """(file, line, language, body) of every fenced code block, indentation removed."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if lang is not None and m.group("lang") != lang:
                continue
            indent = len(m.group("indent"))
            body = "\n".join(ln[indent:] for ln in m.group("body").splitlines())
            out.append((path.name, text[:m.start()].count("\n") + 1, m.group("lang"), body))
    return out


def test_toml_blocks_parse_and_job_configs_load(tmp_path: Path) -> None:
    """Every ```toml block is valid TOML; one made of job-config sections loads through the job config."""
    import tomllib

    from runtime.jobconfig import DEFAULTS, load_config

    found = blocks("toml")
    assert len(found) >= 3, found  # docs/config.md, docs/scheduler.md, docs/training.md
    for name, line, _, body in found:
        try:
            data = tomllib.loads(body)
        except tomllib.TOMLDecodeError as exc:
            raise AssertionError(f"{name}:{line}: not valid TOML: {exc}") from None
        if set(data) <= set(DEFAULTS):
            path = tmp_path / f"{name}-{line}.toml"
            path.write_text(body)
            load_config(path)  # raises ConfigError naming the key


def test_toml_looking_blocks_are_marked_toml() -> None:
    """A block that opens with a [section] header followed by key = value lines is TOML: mark it so."""
    for name, line, lang, body in blocks():
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if lines and re.match(r"^\[[\w.]+\]", lines[0]) and any(re.match(r"^\s*\w+\s*=", ln) for ln in lines):
            assert lang == "toml", f"{name}:{line}: TOML in a ```{lang} block"


FORBIDDEN = [
    (r"\b(DESIGN|REFERENCE)\.md\b", "a file outside the repository"),
    (r"\bissues?\b|\bissue's\b", "an issue (readers of the repository have none)"),
    (r"\bdesign sketch\b", "a design document outside the repository"),
    (r"\bthe (?:README|contract)\b", "an unnamed README or contract (say whose)"),
]


def test_docs_refer_to_nothing_outside_the_repository() -> None:
    bad = []
    for path in DOCS:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in FORBIDDEN:
                for m in re.finditer(pattern, line, re.I):
                    bad.append(f"{path.name}:{i}: {m.group(0)!r} refers to {what}: {line.strip()}")
    assert not bad, "\n".join(bad)


# --- commands ------------------------------------------------------------------------------------------------
def command_lines() -> list[tuple[str, int, str]]:
    """(file, line, command) of every shell line in a code block: `$ ` prompts stripped, continuations joined,
    comments dropped; output lines (a block with `$ ` prompts has output after them) left out."""
    out = []
    for name, line, lang, body in blocks():
        if lang not in ("", "sh", "bash", "console"):
            continue
        prompted = any(ln.startswith("$ ") for ln in body.splitlines())
        joined, buf = [], ""
        for ln in body.splitlines():
            if ln.endswith("\\"):
                buf += ln[:-1] + " "
                continue
            joined.append(buf + ln)
            buf = ""
        for ln in joined:
            if prompted:
                if not ln.startswith("$ "):
                    continue
                ln = ln[2:]
            ln = re.sub(r"\s+#.*$", "", ln).strip()
            if re.match(r"^(moerun|mpirun|mpiexec|srun|torchrun|sbatch|make|python|\.venv/bin/|OMP_NUM_THREADS=)", ln):
                out.append((name, line, ln))
    return out


def _is_synopsis(cmd: str) -> bool:
    """`moerun plan [--top K] {a,b}` and the like: a usage line, not a command to run."""
    return bool(re.search(r"\[[-A-Z.]|\{\w+,|\.\.\.| \| ", cmd))


def _moerun_argvs(cmd: str) -> list[list[str]]:
    """The moerun argv(s) a command line runs (the subcommand of `moerun launch` / `slurm` included)."""
    if "moerun" not in cmd:
        return []  # (and a quoted `python -c "...; ..."` is not cut at its inner `; `)
    words = shlex.split(cmd.split(" > ")[0].split(" && ")[0].split("; ")[0])
    if "moerun" not in words:
        return []
    argv = words[words.index("moerun") + 1:]
    found = [argv]
    if argv and argv[0] in ("launch", "slurm") and "--" in argv:
        found.append(argv[argv.index("--") + 1:])
    return found


def test_moerun_commands_in_docs_parse() -> None:
    """Every moerun command shown in docs/ and README.md is accepted by moerun's own argument parser."""
    from launch.cli import build_parser

    checked = 0
    for name, line, cmd in command_lines():
        if _is_synopsis(cmd):
            continue
        for argv in _moerun_argvs(cmd):
            if not argv:
                continue
            parser = build_parser(only=argv[0])
            try:
                parser.parse_args(argv)
            except SystemExit:
                raise AssertionError(f"{name}:{line}: `moerun {shlex.join(argv)}` does not parse") from None
            checked += 1
    assert checked > 30, checked


def test_files_named_in_doc_commands_exist() -> None:
    for name, line, cmd in command_lines():
        for word in shlex.split(cmd.replace("\\", " ")):
            if re.match(r"^(bench|tests|runtime|launch|ops|parallel|cluster)/[\w/.-]+\.(py|toml)$", word):
                assert (ROOT / word).is_file(), f"{name}:{line}: {word} does not exist ({cmd})"


def test_mpirun_examples_say_what_root_needs() -> None:
    """Open MPI refuses root without --allow-run-as-root (and needs --oversubscribe with few cores): a doc that
    shows mpirun says so."""
    for path in DOCS:
        text = path.read_text()
        shows = [cmd for name, _, cmd in command_lines() if name == path.name and cmd.startswith("mpirun ")]
        if shows:
            assert "--allow-run-as-root" in text and "--oversubscribe" in text, (path.name, shows)


def test_readme_says_how_moerun_gets_on_path() -> None:
    text = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/moerun" in text


def test_bench_commands_use_options_the_scripts_have() -> None:
    """`python bench/X.py --flag ...` in the docs: X.py exists and its --help lists every flag used."""
    import subprocess
    import sys

    helps: dict[str, str] = {}
    checked = 0
    for name, line, cmd in command_lines():
        m = re.search(r"(bench/\w+\.py)(.*)$", cmd)
        if not m:
            continue
        script = m.group(1)
        if script not in helps:
            r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                               cwd=ROOT)
            assert r.returncode == 0, f"{name}:{line}: {script} --help: {r.stderr}"
            helps[script] = r.stdout
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", m.group(2)):
            has = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[script])
            assert has, f"{name}:{line}: {script} has no {flag}"
            checked += 1
    assert checked >= 5, checked


def test_shown_output_of_cheap_commands_is_what_they_print() -> None:
    """Blocks with `$ moerun schedule ...` / `$ moerun slurm ...` (no torch, no ranks): run the command; every
    output line shown under it (but `...` elisions) is a line it prints."""
    import subprocess
    import sys

    ran = 0
    for name, line, _, body in blocks():
        lines = body.splitlines()
        for i, ln in enumerate(lines):
            if not re.match(r"^\$ moerun (schedule|slurm) ", ln):
                continue
            shown = []
            for out in lines[i + 1:]:
                if out.startswith("$ "):
                    break
                shown.append(out)
            r = subprocess.run([sys.executable, "-m", "launch", *shlex.split(ln[len("$ moerun "):])],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
            printed = {x.rstrip() for x in (r.stdout + r.stderr).splitlines()}
            for out in shown:
                if out.strip() and out.strip() != "...":
                    assert out.rstrip() in printed, f"{name}:{line}: {ln!r} prints no {out!r}:\n{r.stdout}{r.stderr}"
            ran += 1
    assert ran >= 2, ran


def test_config_md_lists_every_key_with_its_default(tmp_path: Path) -> None:
    import tomllib

    from runtime.jobconfig import DEFAULTS, load_config

    (name, line, _, body), = [b for b in blocks("toml") if b[0] == "config.md"]
    assert tomllib.loads(body) == DEFAULTS, f"{name}:{line}: keys or defaults differ from runtime/jobconfig.py"
    path = tmp_path / "all.toml"
    path.write_text(body)
    assert load_config(path) == load_config(None)


def test_no_file_of_the_repository_names_files_outside_it() -> None:
    """Readers of the repository have no design or reference notes beside it: nothing may point there."""
    import subprocess

    names = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    pattern = re.compile(r"\b(DESIGN|REFERENCE)\.md\b|\.\./shared/")
    bad = []
    for rel in names:
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".toml", ".sh", ".txt", "") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
