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

__all__ = ["announce", "bind_warning", "load_tokenizer_or_none", "pipe_stage", "serve", "version"]


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
    group = mesh.twin("pp")  # its own p2p stream: a training step may be between slices, receives posted
    executor = PipelineExecutor(build_stages(model, sched, mesh.coord("pp")), sched, pp_group=group,
                                pp_ranks=mesh.ranks("pp"), pp_rank=mesh.coord("pp"))
    return PipeStage(executor, group, engine_pipe=mesh.ranks("pp")[0] == 0)


def bind_warning(endpoint: str, curve: bool) -> str | None:
    """The warning for a server reachable beyond this host without CurveZMQ (None: loopback, IPC, or Curve)."""
    local = endpoint.startswith(("ipc://", "inproc://")) or any(
        f"://{h}" in endpoint for h in ("127.", "localhost", "[::1]"))
    if local or curve:
        return None
    return (f"moerun serve: WARNING: {endpoint} is not loopback and CurveZMQ is off: anyone who can reach it "
            "can generate, read every reply and (with --train) change the weights, unauthenticated and "
            "unencrypted; set serve.curve_secret_key_file and serve.curve_authorized_dir (docs/protocol.md), "
            "or bind 127.0.0.1")


def announce(server, config: dict, training: str = "") -> None:
    """The start-up line (endpoint, pid, cache size, training); a warning on stderr when the server is
    reachable beyond this host without CurveZMQ."""
    e = server.engine
    warning = bind_warning(server.endpoint, server.curve)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"moerun serve: listening on {server.endpoint} pid={os.getpid()} model={config['model']['path']} "
          f"kv_cache={e.cache.num_pages}x{e.page_size} tokens "
          f"({e.cache.bytes_per_token_per_layer} B/token/layer) max_batch={e.max_batch} "
          f"tokenizer={'yes' if server.tokenizer is not None else 'no (send prompt_ids)'}"
          f"{' curve=on' if server.curve else ''}{training}", flush=True)


def serve(config: dict, mesh=None, *, train: bool = False, max_frame_bytes: int = 1 << 20, bind: str | None = None,
          ready: Callable | None = None, on_start: Callable | None = None, on_exit: Callable | None = None) -> int:
    """Serve `config`'s model (and train it, with `train`) until SIGINT / SIGTERM (or `server.stop()`);
    `ready(server)` is called on the driver once the socket is bound. For a program that embeds moerun:
    `on_start(scheduler)` and `on_exit(scheduler)` run on every rank before the loop and after it (the
    scheduler holds the engine, and the training work with its Trainer). Returns the exit code."""
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
                           all_layers=True, max_nodes_per_token=par["max_nodes_per_token"], mtp=par["pp"] == 1)
    pipe = pipe_stage(mesh, model, par["schedule"])
    engine = Engine.from_config(model, sv, pipe, group)
    if train:
        work = TrainWork(trainer, job_steps=max(0, config["train"]["steps"] - trainer.step),
                         reference=bool(config["scheduler"].get("kl_reference", False)), record=True)
    sched = Scheduler(engine, work, scheduler_config(config), WeightVersions(engine, pin=bool(sv["pin_weights"])),
                      group=group, rank=mesh.rank if mesh is not None else 0,
                      progress=mesh.tick if mesh is not None else None)
    if on_start is not None:
        on_start(sched)
    if not sched.is_driver:
        # A launcher's SIGTERM reaches every rank; the others leave on the driver's STOP instead, so a
        # signalled job ends cleanly (a dead driver is caught by the mesh's watchdog).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        while sched.follow():
            pass
        if on_exit is not None:
            on_exit(sched)
        return 0
    info = {"model": config["model"]["path"], "version": version()}
    if mesh is not None:
        info["layout"] = {d: mesh.size(d) for d in ("tp", "pp", "ep", "dp")} | {"world": mesh.world_size}
    server = Server.from_config(sched, sv, bind=bind or sv["bind"], max_frame_bytes=max_frame_bytes,
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
    if on_exit is not None:
        on_exit(sched)
    print("moerun serve: stopped", flush=True)
    return 0
