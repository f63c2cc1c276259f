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


def announce(server, config: dict, training: str = "", metrics_url: str | None = None) -> None:
    """The start-up line (endpoint, pid, cache size, metrics page, training); a warning on stderr when the
    server is reachable beyond this host without CurveZMQ."""
    e = server.engine
    warning = bind_warning(server.endpoint, server.curve)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"moerun serve: listening on {server.endpoint} pid={os.getpid()} model={config['model']['path']} "
          f"kv_cache={e.cache.num_pages}x{e.page_size} tokens "
          f"({e.cache.bytes_per_token_per_layer} B/token/layer) max_batch={e.max_batch} "
          f"{f'speculative=mtp x{e.spec.tokens} ' if e.spec is not None else ''}"
          f"{'cuda_graphs=on ' if e.graphs is not None else ''}"
          f"tokenizer={'yes' if server.tokenizer is not None else 'no (send prompt_ids)'}"
          f"{f' metrics={metrics_url}' if metrics_url else ''}{' curve=on' if server.curve else ''}{training}",
          flush=True)


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
                           schedule=par["schedule"], max_nodes_per_token=par["max_nodes_per_token"],
                           mtp=par["pp"] == 1)
    pipe = pipe_stage(mesh, model, par["schedule"])
    engine = Engine.from_config(model, sv, pipe, group)
    if train:
        work = TrainWork(trainer, job_steps=max(0, config["train"]["steps"] - trainer.step),
                         reference=bool(config["scheduler"].get("kl_reference", False)), record=True)
    # a server resumed from a checkpoint it wrote goes on counting weight versions from where it stopped
    resumed = int(trainer.resume_manifest.get("serving", {}).get("weight_version", 0)) if train else 0
    weights = WeightVersions(engine, pin=bool(sv["pin_weights"]), version=resumed)
    sched = Scheduler(engine, work, scheduler_config(config), weights, group=group,
                      rank=mesh.rank if mesh is not None else 0, progress=mesh.tick if mesh is not None else None)
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
    import zmq

    from runtime.stopping import StopRequest

    ctx = zmq.Context()  # its own: terminating it at the end waits for the last replies to leave
    server = Server.from_config(sched, sv, bind=bind or sv["bind"], max_frame_bytes=max_frame_bytes,
                                tokenizer=load_tokenizer_or_none(config["model"]["path"]), info=info, context=ctx)
    # SIGTERM / SIGINT: finish the step in flight, answer what waits, save what is not saved, exit 0
    StopRequest("moerun serve", on_request=server.request_stop).install()
    training = ""
    if work is not None:
        training = f" training: policy {sched.policy.cfg.policy}, {work.job_left} job steps"
    endpoint = None
    if sv["metrics_bind"]:
        from runtime.serve.metrics_http import MetricsEndpoint

        endpoint = MetricsEndpoint(sv["metrics_bind"], engine.metrics.prometheus).start()
    announce(server, config, training, endpoint.url if endpoint is not None else None)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        if endpoint is not None:
            endpoint.close()
        ctx.term()
    if on_exit is not None:
        on_exit(sched)
    print(stopped_line(server), flush=True)
    return 0


def stopped_line(server) -> str:
    """The last line of a server: why it stopped, how many requests it refused, what it saved."""
    sd = server.shutdown
    line = f"moerun serve: stopped ({server.stop_reason or 'asked to'}) at weight_version {server.weight_version}"
    if sd:
        line += f"; {sd['refused']} waiting request(s) answered unavailable"
    if server.scheduler.work is not None:
        saved = sd.get("saved")
        if saved and "error" in saved:  # e.g. a full disk: the applied updates are in memory only
            line += f"; {saved['error']}"
        else:
            line += (f"; saved checkpoint {saved['path']} (step {saved['step']})" if saved
                     else "; no update since the last checkpoint, nothing to save")
    return line
