"""Run under mpirun by tests/test_serve_failed_step.py: `moerun serve` (with `train`: `--train`) on 2 ranks
(ep=2) whose driver's engine step fails once two requests are generating, as a step that raises on rank 0
while rank 1 waits in the step's collectives. Usage: serve_fail_job.py {serve|train} OUT_DIR."""

from __future__ import annotations

import sys

import cluster
from runtime.jobconfig import load_config
from runtime.serve.app import serve
from runtime.serve.engine import Engine


def main() -> int:
    mode, out = sys.argv[1], sys.argv[2]
    cfg = load_config(None, [
        "model.path=builtin:tiny", "parallel.ep=2", "serve.kv_cache_tokens=512", "serve.page_size=8",
        "serve.max_model_len=128", "serve.max_prefill_tokens=32", "train.steps=0", f"train.out={out}",
        "train.mtp_loss_coef=0.0", "data.seq_len=16", "train.global_batch=4"])
    mesh = cluster.init(ep=2)
    if mesh.rank == 0:
        real = Engine.step

        def failing_step(self):
            if len(self.running) >= 2 and self.metrics.counters["generation_tokens_total"] >= 6:
                raise RuntimeError("injected failure in the driver's step")
            return real(self)

        Engine.step = failing_step
    with mesh:
        serve(cfg, mesh, train=mode == "train", bind="tcp://127.0.0.1:*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
