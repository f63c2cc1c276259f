"""`moerun demo`: the whole loop on the built-in tiny model: train on N ranks, serve the result, stream."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HELP = "train builtin:tiny on 4 ranks, then serve it and stream a generation (what `make demo` runs)"
DESCRIPTION = """\
The main job on the built-in tiny model, end to end:
  1. `moerun launch -n N -- info <config>` (one line per rank: who and where it is) and
     `moerun launch -n N -- selftest <config>` (every collective of the job's layout, checked and timed);
  2. `moerun launch -n N -- train runtime/train/demo.toml`: builtin:tiny on builtin:tinytext with
     pp=2 (DualPipeV) x ep=2 on 4 ranks, metrics in runs/demo/metrics.jsonl, checkpoints in runs/demo/ckpt;
  3. `moerun serve --model <last checkpoint>` on a free loopback port;
  4. `moerun client generate --stream` of a prompt, printed as the tokens arrive;
  5. the server is stopped.
Any step failing stops the demo with that step's exit status."""

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "runtime" / "train" / "demo.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--np", dest="nprocs", type=int, default=4, help="training ranks (default 4)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="training config (default: the demo's)")
    parser.add_argument("--prompt", default="The ", help="prompt to complete after training")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config key (repeatable)")


def _moerun(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def _step(title: str) -> None:
    print(f"\n== moerun demo: {title}", flush=True)


def _latest_checkpoint(out_dir: Path) -> Path:
    ckpt = out_dir / "ckpt"
    pointer = ckpt / "latest"
    if pointer.is_file():
        return ckpt / pointer.read_text().strip()
    steps = sorted(ckpt.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        raise SystemExit(f"moerun demo: training wrote no checkpoint under {ckpt}")
    return steps[-1]


def run(args: argparse.Namespace) -> int:
    from runtime.jobconfig import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"moerun demo: config error: {exc}") from None
    sets = [x for item in args.overrides for x in ("--set", item)]

    _step(f"the {args.nprocs} ranks, and a self-test of the collectives of the job's layout")
    for cmd in (("info", args.config, *sets), ("selftest", args.config, *sets)):
        code = subprocess.call(_moerun("launch", "-n", str(args.nprocs), "--", *cmd))
        if code:
            return code

    _step(f"training on {args.nprocs} ranks ({args.config})")
    code = subprocess.call(_moerun("launch", "-n", str(args.nprocs), "--", "train", args.config, *sets))
    if code:
        return code
    model_dir = _latest_checkpoint(Path(config["train"]["out"]))

    _step(f"serving {model_dir}")
    server = subprocess.Popen(_moerun("serve", "--model", str(model_dir), "--bind", "tcp://127.0.0.1:*"),
                              stdout=subprocess.PIPE, text=True)
    try:
        endpoint = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            print(line, end="", flush=True)
            m = re.search(r"listening on (\S+)", line)
            if m:
                endpoint = m.group(1)
                break
        if endpoint is None:
            print("moerun demo: the server did not start", file=sys.stderr)
            return server.poll() or 1
        _step(f"streaming a generation from {endpoint}")
        return subprocess.call(_moerun("client", "generate", "--connect", endpoint, "--prompt", args.prompt,
                                       "--max-tokens", str(args.max_tokens), "--stream"))
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
