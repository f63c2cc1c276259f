"""`moerun serve`: load the model and serve it over ZeroMQ (msgpack), on one rank or a parallel layout."""

from __future__ import annotations

import argparse

from launch.job import add_config_arguments, load_job_config

HELP = "serve the model over ZeroMQ (msgpack), optionally training too"
DESCRIPTION = """\
Serve a DeepSeek-style MLA/MoE model over ZeroMQ: a ROUTER socket speaking msgpack maps (ops generate,
abort, health, info, metrics; see docs/protocol.md). The engine batches requests continuously over a paged
latent KV cache (see docs/serving.md). The socket binds loopback by default; to serve beyond it, turn on
CurveZMQ (serve.curve_secret_key_file + serve.curve_authorized_dir; keys: `moerun client keygen`), or the
start-up warns that the endpoint is unauthenticated and unencrypted.

Config keys ([serve] section, each also settable with --set serve.KEY=VALUE): bind, max_batch, max_queue,
max_model_len, max_prefill_tokens, page_size, kv_cache_tokens (0: sized from free memory), pin_weights,
metrics_bind (HOST:PORT, e.g. 127.0.0.1:9400: serve the Prometheus text at http://HOST:PORT/metrics;
"" = off, the default; loopback unless you choose otherwise); what one client may take:
max_queue_per_client, max_priority, client_timeout_s (a client silent this long is gone), health_timeout_s;
train ops: max_train_rows, max_train_tokens, max_train_batch_bytes, max_train_queue_bytes;
curve_secret_key_file, curve_authorized_dir (docs/protocol.md); and:
  speculative = "off" | "mtp"   MTP speculative decoding: the checkpoint's multi-token-prediction module
                                drafts, the model verifies (greedy output unchanged; sampled output keeps
                                its distribution). One rank only; needs MTP weights in the checkpoint.
  speculative_tokens = 1..7     drafts per step (default 1)
  cuda_graphs = true | false    replay captured decode steps on CUDA (one rank; unverified on hardware)
Metrics (moerun client metrics) then include spec_acceptance_rate, spec_tokens_per_step and
generation_tokens_per_s. Speed figures and how they were measured: docs/serving.md.

Under a parallel layout (mpirun/srun with parallel.tp / ep / pp > 1) rank 0 owns the socket and the
engine and broadcasts each step's batch plan; every rank runs the same forward on its shard (with pp, its
stage's layers). Stop the job with SIGTERM/SIGINT to the pid printed on the start-up line: the step in
flight ends, waiting requests get an `unavailable` error, under --train a checkpoint is written if an update
was applied since the newest one (`moerun client save` writes one on demand), the last line says "stopped",
and the exit code is 0; a second signal stops at once.

examples:
  moerun serve --model builtin:tiny
  moerun serve job.toml --bind tcp://127.0.0.1:6000 --set serve.page_size=16
  moerun serve job.toml --train          # serve and train the same weights (docs/scheduler.md)
  moerun serve --model builtin:tiny --set serve.metrics_bind=127.0.0.1:9400   # + Prometheus /metrics
  moerun serve --model DIR --set serve.speculative=mtp --set serve.speculative_tokens=2
  mpirun -np 2 moerun serve --model DIR --set parallel.tp=2
  moerun client generate --connect tcp://127.0.0.1:5555 --prompt "Hello" --stream"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", help="model path (HF dir) or builtin:tiny; overrides model.path")
    parser.add_argument("--bind", help="ZeroMQ address to bind, e.g. tcp://127.0.0.1:5555; overrides serve.bind")
    parser.add_argument("--max-frame-bytes", type=int, default=1 << 20,
                        help="largest request frame answered normally (bigger ones get bad_request)")
    parser.add_argument("--train", action="store_true",
                        help="also train: run the [train]/[data] job and accept `train` ops, sharing the "
                             "served weights, interleaved by the [scheduler] policy")


def run(args: argparse.Namespace) -> int:
    config = load_job_config(args)
    if args.model:
        config["model"]["path"] = args.model
    if args.bind:
        config["serve"]["bind"] = args.bind
    if config["serve"]["metrics_bind"]:
        from runtime.serve.metrics_http import parse_bind

        try:
            parse_bind(config["serve"]["metrics_bind"])
        except ValueError as exc:
            raise SystemExit(f"moerun: config error: {exc}") from None
    from cluster.env import RankInfo

    def body(mesh) -> int:
        import zmq

        from runtime.serve.app import serve
        from runtime.serve.curve import CurveError

        try:
            return serve(config, mesh, train=args.train, max_frame_bytes=args.max_frame_bytes)
        except (OSError, ValueError, zmq.ZMQError, CurveError) as exc:  # a missing model, a bad config value,
            # a bind that fails, a bad key file
            raise SystemExit(f"moerun serve: {exc}") from None

    sv = config["serve"]
    try:
        _check_single_rank_switches(sv, RankInfo.from_env().world_size)
    except ValueError as exc:
        raise SystemExit(f"moerun serve: {exc}") from None
    if RankInfo.from_env().world_size > 1:
        from launch.job import run_on_mesh

        return run_on_mesh(config, body)
    return body(None)


def _check_single_rank_switches(serve: dict, world_size: int) -> None:
    """serve.speculative and serve.cuda_graphs run on one rank: refuse a multi-rank job before any rank
    loads a model (the engine checks the same on its own)."""
    on = [f"serve.speculative = {serve['speculative']!r}"] if serve["speculative"] != "off" else []
    on += ["serve.cuda_graphs = true"] if serve["cuda_graphs"] else []
    if on and world_size > 1:
        raise ValueError(f"{' and '.join(on)} run on one rank only, and this job has {world_size} ranks; "
                         "serve on one rank, or leave them off")
