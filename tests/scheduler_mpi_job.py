"""Run under mpirun by tests/test_scheduler_mpi.py: `moerun serve --train`'s body (runtime.serve.app.serve) on
the launcher's ranks; a client thread on rank 0 waits for the config's training job (train.steps), then
generates, sends a `train` op, generates again over ZeroMQ, prints one RESULT line, and stops the server
(which stops the other ranks). Usage: scheduler_mpi_job.py OUT_DIR {ce|grpo} [--set style overrides]."""

from __future__ import annotations

import json
import sys
import threading

import cluster
from runtime.client import Client
from runtime.jobconfig import load_config
from runtime.serve.app import serve

PROMPT = [7, 1, 8, 2, 8, 1, 8]


def train_op(loss: str = "grpo") -> dict:
    rows = [[(13 * i + 7 * j) % 256 for j in range(n)] for i, n in enumerate((10, 8, 10, 6, 9))]
    op = dict(input_ids=rows, loss_mask=[[0] * 3 + [1] * (len(r) - 3) for r in rows], loss=loss)
    if loss == "grpo":
        op.update(advantages=[1.0, -1.0, 0.5, -0.5, 0.25], old_logprobs=[[-4.0] * len(r) for r in rows])
    return op


def job_config(out: str, overrides: list[str]) -> dict:
    return load_config(None, [
        "model.path=builtin:tiny", "train.steps=0", "train.lr=3e-3", "train.warmup_steps=0",
        "train.mtp_loss_coef=0.0", "train.aux_loss_coef=0.0", "train.bias_update_rate=0.0",
        "train.global_batch=4", "data.seq_len=16", f"train.out={out}", "serve.kv_cache_tokens=256",
        "serve.page_size=8", "serve.max_model_len=64", "serve.max_prefill_tokens=16", *overrides])


def main() -> int:
    out, loss, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = job_config(out, overrides)
    par = cfg["parallel"]
    mesh = cluster.init(tp=par["tp"], pp=par["pp"], ep=par["ep"])

    def ready(server) -> None:
        def client() -> None:
            try:
                with Client(server.endpoint, timeout=120) as c:
                    while c.metrics()["metrics"].get("train_job_steps", 0) < cfg["train"]["steps"]:
                        pass  # the config's job first (it runs while the server is idle)
                    g0 = c.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True)
                    t = c.request("train", **train_op(loss))
                    g1 = c.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True, logprobs=1)
                    m = c.metrics()["metrics"]
                print("RESULT " + json.dumps({"g0": g0, "trained": t, "g1": g1, "metrics": {
                    k: v for k, v in m.items() if k.startswith(("train_", "scheduler_", "weight_"))}}), flush=True)
            finally:
                server.request_stop()

        threading.Thread(target=client, daemon=True).start()

    with mesh:
        serve(cfg, mesh, train=True, bind="tcp://127.0.0.1:*", ready=ready)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
