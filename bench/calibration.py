"""The planner checked against this machine: calibrate (`moerun plan --calibrate`), predict the step time of
`moerun train` under three layouts on 4 local ranks, run them, print predicted / measured.

    .venv/bin/python bench/calibration.py --dir /tmp/calib            # one run (a few minutes)
    .venv/bin/python bench/calibration.py --dir /tmp/calib --runs 3   # the docs' figures

Layouts (4 ranks, mpirun): pp=2 x ep=2 under 1F1B, pp=2 x ep=2 under DualPipeV, tp=2 x dp=2. The model is
DeepSeek-V3's architecture at a small size (hidden 256, 4 layers of which 3 MoE with 8 experts, top-2, one
shared expert, 4 heads of q/k 48 and v 32, q_lora 128, kv_lora 64, vocabulary 512), fp32, written once as
an HF checkpoint in --dir; 8 sequences of 256 tokens per step in 4 micro-batches (train.mtp off).
Measured step time: the median of `time_s` in metrics.jsonl over the steps after the first two (warm-up).
Predicted: the planner's step time for that job on the machine profile measured right before it
(runtime/calibrate.py). The machine's load average is printed before and after each run: the CPU is shared,
and the calibration measures it as loaded at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "1f1b pp2 x ep2": ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=1f1b"],
    "dualpipev pp2 x ep2": ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev"],
    "tp2 x dp2": ["parallel.tp=2"],
}
MODEL = dict(hidden_size=256, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, intermediate_size=512, moe_intermediate_size=128,
             num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, n_group=1, topk_group=1, vocab_size=512, num_nextn_predict_layers=0,
             max_position_embeddings=4096)
JOB = ["train.global_batch=8", "data.seq_len=256", "parallel.microbatches=4", "train.mtp_loss_coef=0",
       "train.save_every=0", "train.resume=false", "model.dtype=float32"]


def write_model(path: str) -> None:
    import torch

    from runtime.model.builtin import DEEPSEEK_V3, init_weights
    from runtime.model.config import ModelConfig
    from runtime.model.hf_checkpoint import save_hf_checkpoint
    from runtime.model.loading import build_model

    raw = {**DEEPSEEK_V3, **MODEL}
    raw["rope_scaling"] = {**raw["rope_scaling"], "original_max_position_embeddings": 1024, "factor": 4}
    model = build_model(ModelConfig.from_hf_dict(raw, "calibration"), torch.float32, mtp=False)
    init_weights(model, 0)
    save_hf_checkpoint(model, path)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "MOERUN_"))}
    env.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def moerun(args: list[str], timeout: float) -> str:
    out = subprocess.run([sys.executable, "-m", "launch", *args], env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"moerun {' '.join(args[:3])} ... failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return out.stdout


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def one_run(directory: str, steps: int) -> list[dict]:
    model, machine = os.path.join(directory, "model"), os.path.join(directory, "machine.json")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for name, layout in LAYOUTS.items():  # calibrated right before each run: the machine's load drifts
        moerun(["plan", "--calibrate", "--ranks", "4", "--machine-out", machine, "--json"], timeout=900)
        job = [f"model.path={model}", *JOB, *layout]
        pred = json.loads(moerun(["plan", "--machine", machine, "--ranks", "4", "--json", *sets(job)], 600))
        out = os.path.join(directory, "run-" + name.replace(" ", "_"))
        moerun(["launch", "-n", "4", "--", "train", *sets(job + [f"train.steps={steps}", f"train.out={out}"])],
               timeout=900)
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            times = [json.loads(line)["time_s"] for line in fh][2:]
        measured = statistics.median(times)
        p = pred["prediction"]["step_time_s"]
        rows.append({"layout": name, "predicted_s": p, "measured_s": measured, "ratio": p / measured,
                     "measured_range_s": [min(times), max(times)], "steps_timed": len(times)})
        print(f"  {name:<22} predicted {p:6.3f} s  measured {measured:6.3f} s (steps {min(times):.3f}-"
              f"{max(times):.3f})  predicted / measured {p / measured:5.2f}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the model, machine profile and runs are written")
    p.add_argument("--runs", type=int, default=1, help="whole runs (calibration, predictions, measurements)")
    p.add_argument("--steps", type=int, default=8, help="training steps per layout (the first two not timed)")
    p.add_argument("--json", action="store_true", help="print all rows as JSON at the end")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.dir, "model", "config.json")):
        write_model(os.path.join(args.dir, "model"))
    allrows = []
    for i in range(args.runs):
        print(f"run {i + 1} of {args.runs}", flush=True)
        allrows.append(one_run(args.dir, args.steps))
    if args.json:
        print(json.dumps(allrows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
