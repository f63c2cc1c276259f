"""`moerun serve`: load the model and serve it over ZeroMQ (msgpack), on one rank or a parallel layout."""

from __future__ import annotations

import argparse

from launch.job import add_config_arguments, load_job_config

HELP = "serve the model over ZeroMQ (msgpack), optionally training too"
DESCRIPTION = """\
Serve a DeepSeek-style MLA/MoE model over ZeroMQ: a ROUTER socket speaking msgpack maps (ops generate,
abort, health, info, metrics; see docs/protocol.md). The engine batches requests continuously over a paged
latent KV cache (see docs/serving.md). The socket binds loopback by default; binding another interface
exposes an unauthenticated endpoint, so do it only on a trusted network.

Config keys ([serve] section, each also settable with --set serve.KEY=VALUE): bind, max_batch, max_queue,
max_model_len, max_prefill_tokens, page_size, kv_cache_tokens (0: sized from free memory).

Under a parallel layout (mpirun/srun with parallel.tp / ep / pp > 1) rank 0 owns the socket and the
engine and broadcasts each step's batch plan; every rank runs the same forward on its shard (with pp, its
stage's layers). Stop the job with SIGTERM/SIGINT to the pid printed on the start-up line.

examples:
  moerun serve --model builtin:tiny
  moerun serve job.toml --bind tcp://127.0.0.1:6000 --set serve.page_size=16
  moerun serve job.toml --train          # serve and train the same weights (docs/scheduler.md)
  mpirun -np 2 moerun serve --model DIR --set parallel.tp=2
  moerun client generate --connect tcp://127.0.0.1:5555 --prompt "Hello" --stream"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", help="model path (HF dir) or builtin:tiny; overrides model.path")
    parser.add_argument("--bind", help="ZeroMQ address to bind, e.g. tcp://127.0.0.1:5555; overrides serve.bind")
    parser.add_argument("--max-frame-bytes", type=int, default=1 << 20,
                        help="largest request frame answered normally (bigger ones get bad_request)")
    from runtime.sched.cotrain_server import add_train_flag  # torch-free import

    add_train_flag(parser)


def run(args: argparse.Namespace) -> int:
    config = load_job_config(args)
    if args.model:
        config["model"]["path"] = args.model
    if args.bind:
        config["serve"]["bind"] = args.bind
    from cluster.env import RankInfo

    if args.train:
        return serve_and_train(config, args.max_frame_bytes, RankInfo.from_env().world_size > 1)
    if RankInfo.from_env().world_size > 1:
        from launch.job import run_on_mesh
        from runtime.serve.distributed import serve_on_mesh

        return run_on_mesh(config, lambda mesh: serve_on_mesh(config, mesh, args.max_frame_bytes))
    return serve_single(config, args.max_frame_bytes)


def serve_and_train(config: dict, max_frame_bytes: int, distributed: bool) -> int:
    """`--train`: one copy of the weights, served and trained, interleaved by the [scheduler] policy."""
    from launch.job import run_on_mesh
    from runtime.sched.cotrain_server import serve_with_training
    from runtime.serve.setup import load_tokenizer_or_none, version

    def body(mesh):
        return serve_with_training(config, mesh, max_frame_bytes=max_frame_bytes,
                                   tokenizer=load_tokenizer_or_none(config["model"]["path"]),
                                   info={"version": version()})

    return run_on_mesh(config, body) if distributed else body(None)


def serve_single(config: dict, max_frame_bytes: int) -> int:
    import signal

    import zmq

    import runtime
    from runtime.serve.setup import announce, make_server

    try:
        model = runtime.load_model(config["model"]["path"], dtype=config["model"]["dtype"])
        server = make_server(config, model, max_frame_bytes)
    except (FileNotFoundError, ValueError, OSError, zmq.ZMQError) as exc:
        raise SystemExit(f"moerun serve: {exc}") from None
    announce(server, config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server._stop.set())
    server.serve_forever()
    print("moerun serve: stopped", flush=True)
    return 0
