"""`moerun train CONFIG.toml [--set k=v ...]`: train on every rank of the configured layout."""

from __future__ import annotations

import argparse
import os

from launch.job import add_config_arguments, load_job_config, run_on_mesh

HELP = "train the model from a job config (TOML + --set)"
DESCRIPTION = """\
Train the model of [model] on the tokens of [data] with the layout of [parallel] (tp/pp/ep/dp) and the
optimizer, schedule and checkpointing of [train] (see docs/config.md and docs/training.md).

Rank 0 prints one line per step (step, loss, lr, grad norm, tokens/s, ETA) and a summary at the end, and
writes <train.out>/metrics.jsonl (one JSON object per step). With train.save_every = N a checkpoint is
written atomically every N steps to <train.out>/ckpt/step-N/; with train.resume = true (the default) a
run continues from the newest complete checkpoint there, under any layout.

SIGTERM / SIGINT (to the pid on the start-up line, rank 0's under a launcher) stops the run after the step
in flight: every rank stops at the same step, a checkpoint is saved unless that step already has one, the
last line says "stopped" and where it saved, and the exit code is 0. A second signal stops at once.

examples:
  moerun train job.toml
  moerun train --set train.steps=20 --set data.seq_len=64
  moerun launch -n 4 -- train job.toml --set parallel.ep=2 --set parallel.tp=2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _body(config: dict):
    def body(mesh) -> int:
        from runtime.train.trainer import Trainer, resume_path

        try:
            trainer = Trainer(config, mesh, resume_from=resume_path(config))
        except (FileNotFoundError, NotImplementedError, ValueError) as exc:  # DataError is a ValueError
            raise SystemExit(f"moerun train: {exc}") from None
        from runtime.stopping import StopRequest

        stop = StopRequest("moerun train").install()  # replaces the Mesh's exit-at-once handlers
        group = mesh.group("control") if mesh.world_size > 1 else None
        if mesh.rank == 0:
            print(f"moerun train: layout {mesh.describe()} world={mesh.world_size}, "
                  f"{config['train']['steps']} steps x {config['train']['global_batch']} sequences x "
                  f"{config['data']['seq_len']} tokens, out {config['train']['out']} pid={os.getpid()}", flush=True)
        summary = trainer.fit(stop=lambda: stop.agreed(group))
        if summary["stopped"] and mesh.rank == 0:
            saved = f"checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "no checkpoint"
            print(f"moerun train: stopped ({stop.reason}) after step {trainer.step} of "
                  f"{config['train']['steps']}; {saved} (train.resume = true continues from it)", flush=True)
        return 0

    return body


def run(args: argparse.Namespace) -> int:
    config = load_job_config(args)
    return run_on_mesh(config, _body(config))
