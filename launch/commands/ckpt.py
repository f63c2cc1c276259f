"""`moerun ckpt {info,export} DIR`: look inside training checkpoints and export them to HF format."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "inspect checkpoints and export them to Hugging Face format"
DESCRIPTION = """\
DIR is a checkpoint (<out>/ckpt/step-N), a ckpt directory or a run directory (<train.out>); the latter
two mean their newest complete checkpoint.

  info DIR                  print the manifest: step, layout it was written with, data position, config hash
  export DIR [--out OUT]    write an HF-format model directory (config.json + model.safetensors) that
                            transformers' from_pretrained and `moerun serve --model OUT` load
                            (default OUT: <train.out>/hf-step-N)

examples:
  moerun ckpt info runs/demo
  moerun ckpt export runs/demo/ckpt/step-100 --out runs/demo/hf"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="print a checkpoint's manifest")
    info.add_argument("dir")
    exp = sub.add_parser("export", help="write an HF-format model directory")
    exp.add_argument("dir")
    exp.add_argument("--out", default=None, help="output directory (default: <train.out>/hf-step-N)")
    exp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="cast the weights (default: as trained)")


def run(args: argparse.Namespace) -> int:
    import os

    from runtime.model.hf_checkpoint import CheckpointError
    from runtime.train.checkpoint import export_hf, read_manifest, resolve_checkpoint

    try:
        step_dir = resolve_checkpoint(args.dir)
        if args.action == "info":
            manifest = read_manifest(step_dir)
            manifest.pop("rng", None)
            print(step_dir)
            print(json.dumps(manifest, indent=1, sort_keys=True))
            return 0
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
        out = args.out or os.path.join(run_dir, f"hf-{os.path.basename(os.path.abspath(step_dir))}")
        export_hf(step_dir, out, args.dtype)
        print(f"exported {step_dir} -> {out}")
        return 0
    except (CheckpointError, OSError) as exc:
        print(f"moerun ckpt: {exc}", file=sys.stderr)
        return 2
