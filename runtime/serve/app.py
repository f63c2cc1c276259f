"""`serve(config, mesh)`: the one way a job serves, on one rank or many, with or without training.

It builds what every rank needs (the model, or a Trainer that owns it; the engine on this rank's pipeline
stage; the training work when the job trains; the shared Scheduler over the control group), then the driver
(rank 0) opens the ZeroMQ server and runs the loop while every other rank follows the scheduler's broadcast
steps. `moerun serve` and `moerun serve --train` are this function.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["announce", "load_tokenizer_or_none", "pipe_stage", "serve", "version"]


def version() -> str:
    """The installed moerun version ("0" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moerun")
    except PackageNotFoundError:
        return "0"


def load_tokenizer_or_none(path: str):
    from runtime.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ImportError, OSError, ValueError):
        return None


def pipe_stage(mesh, model, schedule: str):
    """This rank's part of the serving pipeline (None when pp = 1): the job's own schedule made forward-only,
    over the stages this rank holds under it (two under DualPipe(V)), with pp micro-batches per step
    (2 pp for DualPipe(V), the fewest they accept)."""
    if mesh is None or mesh.size("pp") == 1:
        return None
    from parallel.pipeline import build, forward_only
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.stages import build_stages
    from runtime.serve.step import PipeStage

    pp = mesh.size("pp")
    sched = forward_only(build(schedule, pp, 2 * pp if schedule in ("dualpipe", "dualpipev") else pp))
    executor = PipelineExecutor(build_stages(model, sched, mesh.coord("pp")), sched, mesh)
    return PipeStage(executor, mesh.group("pp"), engine_pipe=mesh.ranks("pp")[0] == 0)


def announce(server, config: dict, training: str = "") -> None:
    """The start-up line (endpoint, pid, cache size, training); a warning on stderr when the bind is not
    loopback."""
    e = server.engine
    ep = server.endpoint
    if not (ep.startswith(("ipc://", "inproc://")) or "://127." in ep or "://localhost" in ep or "://[::1]" in ep):
        print(f"moerun serve: WARNING: {ep} is not loopback; the protocol has no authentication, expose it "
              "only on a trusted network", file=sys.stderr, flush=True)
    print(f"moerun serve: listening on {server.endpoint} pid={os.getpid()} model={config['model']['path']} "
          f"kv_cache={e.cache.num_pages}x{e.page_size} tokens "
          f"({e.cache.bytes_per_token_per_layer} B/token/layer) max_batch={e.max_batch} "
          f"tokenizer={'yes' if server.tokenizer is not None else 'no (send prompt_ids)'}{training}", flush=True)


def serve(config: dict, mesh=None, *, train: bool = False, max_frame_bytes: int = 1 << 20, bind: str | None = None,
          ready: Callable | None = None) -> int:
    """Serve `config`'s model (and train it, with `train`) until SIGINT / SIGTERM (or `server.stop()`);
    `ready(server)` is called on the driver once the socket is bound. Returns the exit code."""
    from cluster.mesh import default_device
    from runtime.sched.scheduler import Scheduler, scheduler_config
    from runtime.sched.weights import WeightVersions
    from runtime.serve.engine import Engine
    from runtime.serve.server import Server

    par, sv = config["parallel"], config["serve"]
    device = mesh.device if mesh is not None else default_device()
    group = mesh.group("control") if mesh is not None and mesh.world_size > 1 else None
    work = None
    if train:
        from runtime.sched.work import TrainWork
        from runtime.train.trainer import Trainer, resume_path

        trainer = Trainer(config, mesh, resume_from=resume_path(config))  # continues a run as `moerun train`
        model = trainer.model
    else:
        from runtime.model.loading import load_model

        model = load_model(config["model"]["path"], mesh, dtype=config["model"]["dtype"], device=str(device),
                           schedule=par["schedule"], max_nodes_per_token=par["max_nodes_per_token"],
                           mtp=par["pp"] == 1)
    pipe = pipe_stage(mesh, model, par["schedule"])
    engine = Engine.from_config(model, sv, pipe, group)
    if train:
        work = TrainWork(trainer, job_steps=max(0, config["train"]["steps"] - trainer.step),
                         reference=bool(config["scheduler"].get("kl_reference", False)), record=True)
    sched = Scheduler(engine, work, scheduler_config(config), WeightVersions(engine, pin=bool(sv["pin_weights"])),
                      group=group, rank=mesh.rank if mesh is not None else 0)
    if not sched.is_driver:
        # A launcher's SIGTERM reaches every rank; the others leave on the driver's STOP instead, so a
        # signalled job ends cleanly (a dead driver is caught by the mesh's watchdog).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        while sched.follow():
            pass
        return 0
    info = {"model": config["model"]["path"], "version": version()}
    if mesh is not None:
        info["layout"] = {d: mesh.size(d) for d in ("tp", "pp", "ep", "dp")} | {"world": mesh.world_size}
    server = Server(sched, bind=bind or sv["bind"], max_queue=sv["max_queue"], max_frame_bytes=max_frame_bytes,
                    tokenizer=load_tokenizer_or_none(config["model"]["path"]), info=info)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.request_stop())
    training = ""
    if work is not None:
        training = f" training: policy {sched.policy.cfg.policy}, {work.job_left} job steps"
    announce(server, config, training)
    if ready is not None:
        ready(server)
    server.serve_forever()
    print("moerun serve: stopped", flush=True)
    return 0
