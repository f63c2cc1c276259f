"""The job configuration: TOML file + `--set section.key=value` overrides, validated against one schema.

Pure Python (no torch), so the launcher can read and check a config before any rank starts. Unknown
sections or keys are errors that name the key and list the valid ones; values are checked against the
type of their default. Every key and its default: docs/config.md.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULTS", "ConfigError", "load_config", "apply_overrides", "parse_set"]


class ConfigError(ValueError):
    """A config that cannot run (a job config key or value, or a model's config.json field); the message
    names the key or field."""


DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"path": "builtin:tiny", "dtype": "float32"},
    "parallel": {
        "tp": 1, "pp": 1, "ep": 1, "dp": 0,
        "schedule": "1f1b", "microbatches": 8,
        "max_nodes_per_token": 0,  # extension: node-limited routing under EP (0 = off)
        "emulate_link": {"bandwidth_gbps": 0.0, "latency_us": 0.0},
    },
    "train": {
        "steps": 100, "lr": 3e-4, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.1,
        "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0, "seed": 0,
        "global_batch": 8, "aux_loss_coef": 1e-4, "bias_update_rate": 1e-3, "mtp_loss_coef": 0.3,
        "out": "runs/default", "save_every": 0, "resume": True,
        "fp8": False,  # extension (docs/training.md): the FP8 training recipe of ops/fp8_train.py
    },
    "data": {"path": "builtin:tinytext", "seq_len": 256, "shuffle": True},
    "serve": {
        "bind": "tcp://127.0.0.1:5555", "max_batch": 64, "max_queue": 1024,
        "max_model_len": 4096, "max_prefill_tokens": 2048, "page_size": 64, "kv_cache_tokens": 0,
        "pin_weights": False,
        # extensions (docs/protocol.md): what one client may take, when it counts as gone, `train` op bounds
        "max_queue_per_client": 256, "max_priority": 1000, "health_timeout_s": 30.0, "client_timeout_s": 10.0,
        "max_train_rows": 1024, "max_train_tokens": 65536, "max_train_batch_bytes": 32 << 20,
        "max_train_queue_bytes": 256 << 20,
        # CurveZMQ beyond loopback: this server's NAME.key_secret, and the clients' NAME.key files ("*": any)
        "curve_secret_key_file": "", "curve_authorized_dir": "",
        "metrics_bind": "",  # extension: HOST:PORT of the Prometheus /metrics page ("": off)
        # extensions (docs/serving.md): MTP speculative decoding, CUDA-graph decode steps
        "speculative": "off", "speculative_tokens": 1, "cuda_graphs": False,
    },
    # The shared train/serve scheduler (docs/scheduler.md): which kind of step runs when both have work.
    "scheduler": {"policy": "serve_first", "share": 0.5, "max_train_microsteps": 8, "split_backward": True,
                  "kl_reference": False},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "parallel.schedule": ("1f1b", "zb1p", "dualpipe", "dualpipev", "gpipe"),
    "scheduler.policy": ("serve_first", "time_share", "train_first"),
    "serve.speculative": ("off", "mtp"),
}


def _check_value(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list) or len(value) != len(default):
            raise ConfigError(f"{key} must be a list of {len(default)} numbers, got {value!r}")
        value = [_check_value(f"{key}[{i}]", d, v) for i, (d, v) in enumerate(zip(default, value))]
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(CHOICES[key])}")
    return value


def _merge(into: dict, new: dict, schema: dict, prefix: str) -> None:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in schema:
            valid = ", ".join(f"{prefix}{name}" for name in schema)
            what = "section" if not prefix else "key"
            raise ConfigError(f"unknown config {what} {key!r}; valid: {valid}")
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a table, got {v!r}")
            _merge(into[k], v, schema[k], f"{key}.")
        else:
            into[k] = _check_value(key, schema[k], v)


def parse_set(item: str) -> tuple[list[str], Any]:
    """`parallel.tp=2` -> (["parallel", "tp"], 2). Values are TOML literals; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r}: the key must be section.name (e.g. parallel.tp=2)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(config: dict, items: Iterable[str]) -> dict:
    for item in items:
        path, value = parse_set(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(config, nested, DEFAULTS, "")
    return config


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- TOML file <- --set overrides; returns a plain nested dict."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        _merge(config, data, DEFAULTS, "")
    apply_overrides(config, overrides)
    par = config["parallel"]
    for k in ("tp", "pp", "ep"):
        if par[k] < 1:
            raise ConfigError(f"parallel.{k} must be >= 1, got {par[k]}")
    return config


def dumps(config: dict) -> str:
    return json.dumps(config, sort_keys=True)
