"""Multi-rank serving: rank 0 owns the socket, the engine and the batch plan; every rank runs the forward.

Each engine step's `StepPlan` (plain integers) is msgpack-encoded and broadcast over the world group as a
uint8 tensor (no pickle, not even between ranks); the other ranks run `run_plan` with their shard of the
model on their own copy of the page pool (same page ids, since only rank 0 allocates). With TP the latent
is replicated, so every rank's pool holds the same rows; with EP the experts' all-to-all needs every rank
in the forward, which is why all ranks run every step. With pp, each stage runs its own layers (hidden
states go stage to stage point-to-point, the last stage sends the logits rows to rank 0): a plain forward
pipeline over the step's whole batch, not yet split into overlapping micro-batches. While idle, rank 0
broadcasts a keep-alive so the others' waiting broadcast never reaches the collective timeout.
"""

from __future__ import annotations

import time

import msgpack
import torch
import torch.distributed as dist

from runtime.serve.cache import PagedLatentCache
from runtime.serve.step import PipeStage, StepPlan, run_plan

__all__ = ["MAX_PLAN_BYTES", "PlanChannel", "serve_on_mesh", "worker_loop"]

KEEPALIVE_S = 5.0
MAX_PLAN_BYTES = 64 << 20  # one broadcast message; a step plan is a few integers per scheduled token


class PlanChannel:
    """Broadcast msgpack maps from rank 0 of `group` to its other ranks (length, then bytes).

    Both ends hold a message to `MAX_PLAN_BYTES`: `send` refuses a larger one before broadcasting anything
    (so the ranks stay in step), and `recv` refuses a length outside the bound before allocating for it."""

    def __init__(self, group, src: int = 0, device: torch.device | str = "cpu") -> None:
        self.group, self.src, self.device = group, src, device
        self.last = time.monotonic()

    def send(self, msg: dict) -> None:
        raw = msgpack.packb(msg)
        if len(raw) > MAX_PLAN_BYTES:
            raise ValueError(f"plan message of {len(raw)} bytes exceeds the limit of {MAX_PLAN_BYTES} bytes "
                             "(MAX_PLAN_BYTES); nothing was sent")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
        dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), self.src,
                       group=self.group)
        dist.broadcast(data, self.src, group=self.group)
        self.last = time.monotonic()

    def recv(self) -> dict:
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(n, self.src, group=self.group)
        size = int(n.item())
        if not 0 <= size <= MAX_PLAN_BYTES:
            raise ValueError(f"broadcast plan length {size} bytes is outside [0, {MAX_PLAN_BYTES}] "
                             "(MAX_PLAN_BYTES): a corrupt or mismatched sender")
        data = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(data, self.src, group=self.group)
        return msgpack.unpackb(data.cpu().numpy().tobytes(), raw=False)

    def keepalive(self) -> None:
        if time.monotonic() - self.last > KEEPALIVE_S:
            self.send({"t": "noop"})


def pipe_stage(mesh, num_layers: int) -> PipeStage | None:
    """This rank's serving pipeline stage (None when pp = 1): layers split as `parallel.pipeline.stages`."""
    if mesh.size("pp") == 1:
        return None
    from parallel.pipeline.stages import layer_split

    pp, s = mesh.size("pp"), mesh.coord("pp")
    ranks = mesh.ranks("pp")  # global ranks of this rank's pipeline, stage order
    engine_pipe = ranks[0] == 0  # the pipeline that contains the engine's rank
    return PipeStage(
        layer_ids=list(layer_split(num_layers, pp)[s]), first=s == 0, last=s == pp - 1,
        prev_rank=ranks[s - 1] if s > 0 else None, next_rank=ranks[s + 1] if s < pp - 1 else None,
        logits_to=0 if (engine_pipe and s == pp - 1) else None,
        logits_from=ranks[-1] if mesh.rank == 0 else None, micro=pp,
    )


def worker_loop(model, channel: PlanChannel, pipe: PipeStage | None = None) -> None:
    """Ranks > 0: build the same page pool as rank 0, then run every broadcast plan until told to stop."""
    head = channel.recv()
    cfg = model.config
    p = model.lm_head.weight
    n_layers = len(model.model.layers) if pipe is None else len(pipe.layer_ids)
    cache = PagedLatentCache(n_layers, head["num_pages"], head["page_size"], cfg.kv_lora_rank,
                             cfg.qk_rope_head_dim, p.dtype, p.device)
    while True:
        msg = channel.recv()
        if msg["t"] == "stop":
            return
        if msg["t"] == "plan":
            run_plan(model, cache, StepPlan.from_dict(msg["plan"]), pipe)


def serve_on_mesh(config: dict, mesh, max_frame_bytes: int) -> int:
    import signal

    from runtime.model.loading import load_model
    from runtime.serve.setup import announce, build_engine, make_server

    # This rank's TP/EP shard of every layer (on the CPU, as the plan broadcasts); with pp, its stage runs
    # only the stage's layers.
    model = load_model(config["model"]["path"], mesh, dtype=config["model"]["dtype"], device="cpu",
                       all_layers=True, max_nodes_per_token=config["parallel"]["max_nodes_per_token"])
    pipe = pipe_stage(mesh, len(model.model.layers))
    channel = PlanChannel(mesh.group("world"))
    if mesh.rank != 0:
        # A launcher's SIGTERM reaches every rank; the workers leave on rank 0's "stop" broadcast instead,
        # so a signalled job ends cleanly (a dead rank 0 is caught by the mesh's watchdog).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        worker_loop(model, channel, pipe)
        return 0
    engine = build_engine(config, model)
    if pipe is not None:
        engine.set_pipeline(pipe)
    channel.send({"t": "head", "num_pages": engine.cache.num_pages, "page_size": engine.page_size})
    engine.plan_hook = lambda plan: channel.send({"t": "plan", "plan": plan.to_dict()})
    layout = {d: mesh.size(d) for d in ("tp", "pp", "ep", "dp")} | {"world": mesh.world_size}
    server = make_server(config, model, max_frame_bytes, engine=engine, layout=layout)
    server.on_idle = channel.keepalive
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server._stop.set())
    announce(server, config)
    try:
        server.serve_forever()
    finally:
        channel.send({"t": "stop"})
    print("moerun serve: stopped", flush=True)
    return 0
