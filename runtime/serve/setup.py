"""Build the serving Engine and Server from a job config, and print the start-up line.

Shared by `moerun serve` (one rank) and `runtime.serve.distributed.serve_on_mesh` (rank 0 of a parallel
layout); it lives in runtime so that the distributed path does not reach up into `launch`.
"""

from __future__ import annotations

__all__ = ["announce", "build_engine", "load_tokenizer_or_none", "make_server", "version"]


def build_engine(config: dict, model):
    from runtime.serve import Engine

    s = config["serve"]
    return Engine(model, max_batch=s["max_batch"], max_model_len=s["max_model_len"],
                  max_prefill_tokens=s["max_prefill_tokens"], page_size=s["page_size"],
                  kv_cache_tokens=s["kv_cache_tokens"])


def load_tokenizer_or_none(path: str):
    from runtime.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ImportError, OSError, ValueError):
        return None


def make_server(config: dict, model, max_frame_bytes: int, engine=None, layout: dict | None = None):
    from runtime.serve.server import Server

    path = config["model"]["path"]
    engine = engine or build_engine(config, model)
    return Server(engine, bind=config["serve"]["bind"], max_queue=config["serve"]["max_queue"],
                  max_frame_bytes=max_frame_bytes, tokenizer=load_tokenizer_or_none(path),
                  info={"model": path, "layout": layout or {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "world": 1},
                        "version": version()})


def version() -> str:
    """The installed moerun version ("0" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moerun")
    except PackageNotFoundError:
        return "0"


def announce(server, config: dict) -> None:
    """Print the start-up line (endpoint, pid, cache size); warn on stderr when the bind is not loopback."""
    import os
    import sys

    e = server.engine
    ep = server.endpoint
    if not (ep.startswith(("ipc://", "inproc://")) or "://127." in ep or "://localhost" in ep or "://[::1]" in ep):
        print(f"moerun serve: WARNING: {ep} is not loopback; the protocol has no authentication, expose it "
              "only on a trusted network", file=sys.stderr, flush=True)

    print(f"moerun serve: listening on {server.endpoint} pid={os.getpid()} model={config['model']['path']} "
          f"kv_cache={e.cache.num_pages}x{e.page_size} tokens "
          f"({e.cache.bytes_per_token_per_layer} B/token/layer) max_batch={e.max_batch} "
          f"tokenizer={'yes' if server.tokenizer is not None else 'no (send prompt_ids)'}", flush=True)
