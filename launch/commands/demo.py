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

HELP = "train builtin:tiny on 4 ranks, then serve and co-train it on the same ranks (what `make demo` runs)"
DESCRIPTION = """\
The main job on the built-in tiny model, end to end:
  1. `moerun launch -n N -- info <config>` (one line per rank: who and where it is) and
     `moerun launch -n N -- selftest <config>` (every collective of the job's layout, checked and timed);
  2. `moerun launch -n N -- train runtime/train/demo.toml`: builtin:tiny on builtin:tinytext with
     pp=2 (DualPipeV) x ep=2 on 4 ranks, metrics in runs/demo/metrics.jsonl, checkpoints in runs/demo/ckpt;
  3. `moerun launch -n N -- serve <config> --train --set train.resume=true --set train.steps=<steps + 10>`:
     the same ranks and layout resume the last checkpoint, serve it over ZeroMQ on a free loopback port
     and go on training it (10 more job steps) between serving steps, on the same weights;
  4. `moerun client generate --stream` of a prompt, printed as the tokens arrive (tagged with the weight
     version that produced them);
  5. a `train` op (cross-entropy on the generated tokens) applied by the same ranks, and the prompt again on
     the updated weights;
  6. the server is stopped: SIGTERM to the launcher, which hands it to rank 0; the job finishes its step,
     saves the co-trained weights (runs/demo/ckpt) and every rank exits 0.
Any step failing stops the demo with that step's exit status."""

MORE_STEPS = 10  # job steps the server trains while it serves

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
    _latest_checkpoint(Path(config["train"]["out"]))  # a clear error if training wrote none

    steps = config["train"]["steps"] + MORE_STEPS
    _step(f"serving and co-training the trained weights on the same {args.nprocs} ranks and layout")
    server = subprocess.Popen(
        _moerun("launch", "-n", str(args.nprocs), "--", "serve", args.config, *sets, "--train",
                "--set", "train.resume=true", "--set", f"train.steps={steps}", "--bind", "tcp://127.0.0.1:*"),
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        endpoint = _endpoint(server)
        if endpoint is None:
            print("moerun demo: the server did not start", file=sys.stderr)
            return server.poll() or 1
        _step(f"streaming a generation from {endpoint} (while the job's {MORE_STEPS} more steps train)")
        code = subprocess.call(_moerun("client", "generate", "--connect", endpoint, "--prompt", args.prompt,
                                       "--max-tokens", str(args.max_tokens), "--stream"))
        if code:
            return code
        _step("a `train` op on the same ranks and weights, then the prompt again")
        return _cotrain(endpoint, args.prompt, args.max_tokens)
    finally:
        _stop(server)


def _endpoint(server: subprocess.Popen) -> str | None:
    """Echo the server's output until its listening line (then keep echoing it on a thread, so the
    ranks never block on a full pipe); the endpoint, or None if it ended first."""
    import threading

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            return None
        print(line, end="", flush=True)
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=lambda: [print(ln, end="", flush=True) for ln in server.stdout],
                             daemon=True).start()
            return m.group(1)
    return None


def _cotrain(endpoint: str, prompt: str, max_tokens: int) -> int:
    from runtime.client import Client, ServerError

    try:
        with Client(endpoint, timeout=300) as c:
            before = c.generate(prompt=prompt, max_tokens=max_tokens)
            ids = before["ids"]
            reply = c.request("train", input_ids=[ids], loss_mask=[[0] + [1] * (len(ids) - 1)], loss="ce")
            print(f"train op: loss {reply['loss']:.4f}, weight_version {reply['weight_version']} "
                  f"(step {reply['step']})", flush=True)
            after = c.generate(prompt=prompt, max_tokens=max_tokens, logprobs=1)
            versions = sorted(set(after.get("weight_versions", [])))
            print(f"after the op (weight versions {versions}): {after.get('text', after['ids'])!r}", flush=True)
            m = c.metrics()["metrics"]
            print(f"server: at optimizer step {m.get('train_optimizer_steps')} ({m.get('train_job_steps')} job steps "
                  f"trained while serving, then the op), weight_version {m.get('weight_version')}", flush=True)
    except (ServerError, TimeoutError) as exc:
        print(f"moerun demo: co-training failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
