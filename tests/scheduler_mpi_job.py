"""Run under mpirun by tests/test_scheduler_mpi.py: `moerun serve --train`'s body (runtime.serve.app.serve) on
the launcher's ranks. A client thread on rank 0 waits for the config's training job (train.steps), then
generates, sends the `train` ops named on the command line, generates again over ZeroMQ, prints one RESULT
line, and stops the server (which stops the other ranks).

Every rank also records the experts its gates chose while serving; when serving ends each rank runs the
training forward (the job's pipeline schedule, forward-only, when pipelined) on the last generation's tokens
and checks that its gates chose the same experts for every token (printing ROUTES rank=R layers=N), and rank
0 prints the training forward's log-probabilities of the generated tokens (FORWARD line).

Usage: scheduler_mpi_job.py OUT_DIR OPS [--set style overrides]; OPS: comma-separated losses of the train
ops, in order: ce, grpo, grpo-kl (grpo with a KL term; needs scheduler.kl_reference=true)."""

from __future__ import annotations

import json
import sys
import threading

import torch

import cluster
from runtime.client import Client
from runtime.jobconfig import load_config
from runtime.serve.app import serve

PROMPT = [7, 1, 8, 2, 8, 1, 8]
NEW = 6


def train_op(loss: str = "grpo") -> dict:
    rows = [[(13 * i + 7 * j) % 256 for j in range(n)] for i, n in enumerate((10, 8, 10, 6, 9))]
    op = dict(input_ids=rows, loss_mask=[[0] * 3 + [1] * (len(r) - 3) for r in rows], loss=loss.split("-")[0])
    if loss.startswith("grpo"):
        op.update(advantages=[1.0, -1.0, 0.5, -0.5, 0.25], old_logprobs=[[-4.0] * len(r) for r in rows])
    if loss == "grpo-kl":
        op["kl_coef"] = 0.3
    return op


def job_config(out: str, overrides: list[str]) -> dict:
    return load_config(None, [
        "model.path=builtin:tiny", "train.steps=0", "train.lr=3e-3", "train.warmup_steps=0",
        "train.mtp_loss_coef=0.0", "train.aux_loss_coef=0.0", "train.bias_update_rate=0.0",
        "train.global_batch=4", "data.seq_len=16", f"train.out={out}", "serve.kv_cache_tokens=256",
        "serve.page_size=8", "serve.max_model_len=64", "serve.max_prefill_tokens=16", *overrides])


class Routes:
    """Forward hooks on this rank's gates: the experts chosen for each token, per layer, in eval mode."""

    def __init__(self, model) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers) if layer.is_moe]

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not module.training:
                self.rows.setdefault(layer, []).append(output[1].detach().sort(dim=-1).values)
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        out = {k: torch.cat(v) for k, v in self.rows.items()}
        self.rows.clear()
        return out


def main() -> int:
    out, ops, overrides = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    cfg = job_config(out, overrides)
    par = cfg["parallel"]
    mesh = cluster.init(tp=par["tp"], pp=par["pp"], ep=par["ep"])
    result: dict = {}
    routes: list[Routes] = []

    def ready(server) -> None:
        def client() -> None:
            try:
                with Client(server.endpoint, timeout=150) as c:
                    while c.metrics()["metrics"].get("train_job_steps", 0) < cfg["train"]["steps"]:
                        pass  # the config's job first (it runs while the server is idle)
                    g0 = c.generate(prompt_ids=PROMPT, max_tokens=NEW, ignore_eos=True)
                    trained = [c.request("train", **train_op(loss)) for loss in ops]
                    g1 = c.generate(prompt_ids=PROMPT, max_tokens=NEW, ignore_eos=True, logprobs=1)
                    m = c.metrics()["metrics"]
                result.update(g0=g0, trained=trained, g1=g1, metrics={
                    k: v for k, v in m.items() if k.startswith(("train_", "scheduler_", "weight_"))})
                print("RESULT " + json.dumps(result), flush=True)
            finally:
                server.request_stop()

        threading.Thread(target=client, daemon=True).start()

    def on_start(sched) -> None:
        routes.append(Routes(sched.engine.model))

    def on_exit(sched) -> None:
        check_against_the_training_forward(sched, routes[0], mesh, result.get("g1", {}).get("ids"))

    with mesh:
        serve(cfg, mesh, train=True, bind="tcp://127.0.0.1:*", ready=ready, on_start=on_start, on_exit=on_exit)
    return 0


def check_against_the_training_forward(sched, routes: Routes, mesh, generated: list[int] | None) -> None:
    """Every rank: the experts its gates chose for the last generation's tokens while serving equal those of
    the training forward over the same tokens; rank 0 prints that forward's log-probabilities of them."""
    served = {k: v[-(len(PROMPT) + NEW - 1):] for k, v in routes.take().items()}  # the last request's tokens
    gen = torch.tensor(generated if mesh.rank == 0 else [0] * NEW, dtype=torch.long, device="cpu")
    torch.distributed.broadcast(gen, 0, group=mesh.group("control"))
    ids = torch.tensor([PROMPT + gen.tolist()[:-1]], device=mesh.device)
    trainer = sched.work.trainer
    model = trainer.model.eval()
    with torch.no_grad():
        if trainer.pipelined:
            logits = trainer.forward_pipeline(model).run_forward([ids] * trainer.microbatches)[0]
        else:
            logits = model.logits(ids)
    trained = routes.take()
    for layer, rows in served.items():
        assert torch.equal(rows, trained[layer][: rows.shape[0]]), f"rank {mesh.rank} layer {layer}: experts differ"
    print(f"ROUTES rank={mesh.rank} layers={len(served)}", flush=True)
    if mesh.rank == 0:
        lp = torch.log_softmax(logits[0].float(), -1)
        chosen = [float(lp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(gen.tolist())]
        print("FORWARD " + json.dumps(chosen), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
