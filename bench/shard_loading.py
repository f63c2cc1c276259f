"""Shard-only loading of an FP8 block-quantised checkpoint: per-rank peak RSS against the rank's share, and
logits under pp=2 x ep=2 against one process.

    .venv/bin/python bench/shard_loading.py --geometry v3 --dir /tmp/v3ckpt       # a few GB on disk
    .venv/bin/python bench/shard_loading.py --geometry small --dir /tmp/small     # what the test runs

Writes (once) an HF-format checkpoint whose decoder-layer linear weights are float8_e4m3fn with 128x128
`weight_scale_inv` blocks, as DeepSeek-V3 releases them. `--geometry v3` has DeepSeek-V3's real shapes
(hidden 7168, 128 heads, q_lora 1536, kv_lora 512, dense intermediate 18432, expert intermediate 2048) with
2 layers (one dense, one MoE of 8 experts + 1 shared) and a 32768-token vocabulary, so it fits a few GB;
`small` keeps every feature (partial 128-blocks included) at a size CI can run. Then it loads the checkpoint
in one process and on 4 ranks (mpirun, pp=2 x ep=2, 1f1b), each measuring its peak RSS during the load
(Linux VmHWM after resetting it through /proc/self/clear_refs, minus the RSS before), and prints per rank:
the checkpoint bytes it read (its share), the bytes of the parameters it materialised, the peak RSS
increase and the bound it must stay within, and the largest logits difference to the single process.

Bound: peak RSS increase <= materialised bytes + share of the checkpoint (its file pages are mapped while
read) + OVERHEAD_MIB (per geometry). Exit status 1 when a bound or the 1e-4 logits parity fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The fixed overhead of the bound, per geometry: what one read holds beside its destination (a band of at most
# 64 MiB of checkpoint data, or its FP8 block rows dequantised to fp32; at the small geometry the largest whole
# tensor, the 9 MiB bf16 embedding) plus allocator slack.
OVERHEAD_MIB = {"v3": 96, "small": 24}
PARITY = 1e-4
PROMPT = [3, 17, 5, 99, 42, 7, 1, 64]

GEOMETRIES = {
    # DeepSeek-V3's real shapes, 2 layers, 8 experts, smaller vocabulary
    "v3": dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8,
               n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=32768),
    # every feature at CI size: dims that are not multiples of 128 (partial blocks), 8 experts, a vocabulary
    # large enough that the embedding and head (one per pipeline stage) weigh as in a real model
    "small": dict(hidden_size=576, num_attention_heads=4, q_lora_rank=384, kv_lora_rank=256,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=1000,
                  moe_intermediate_size=328, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, vocab_size=8192),
}


def model_config(geometry: str):
    from runtime.model.builtin import DEEPSEEK_V3
    from runtime.model.config import ModelConfig

    raw = {**DEEPSEEK_V3, **GEOMETRIES[geometry], "num_nextn_predict_layers": 0, "max_position_embeddings": 4096}
    raw["rope_scaling"] = {**raw["rope_scaling"], "original_max_position_embeddings": 1024, "factor": 4}
    return ModelConfig.from_hf_dict(raw, f"shard_loading:{geometry}")


def write_checkpoint(path: str, geometry: str, seed: int = 0) -> int:
    """Write the checkpoint one tensor at a time (one safetensors file per layer); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from ops.fp8 import block_quantize
    from runtime.model.hf_checkpoint import INDEX_NAME, hf_tensors
    from runtime.model.loading import build_model

    cfg = model_config(geometry)
    os.makedirs(path, exist_ok=True)
    meta = build_model(cfg, torch.bfloat16, mtp=False, materialize=False)
    named = list(meta.named_parameters()) + [(n, b) for n, b in meta.named_buffers()]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(seed)
    for name, t in hf_tensors(named, cfg.num_hidden_layers):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        shard = f"layer{m.group(1)}" if m else "outer"
        if name.endswith("e_score_correction_bias"):
            value = torch.randn(t.shape, generator=g) * 0.1
        elif "norm" in name:
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            value = torch.randn(t.shape, generator=g) * (1.0 / t.shape[-1] ** 0.5)
        fp8 = value.dim() == 2 and m is not None and not name.endswith("mlp.gate.weight")
        if fp8:
            q, s = block_quantize(value)
            groups.setdefault(shard, {}).update({name: q, name + "_scale_inv": s})
        else:
            keep = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            groups.setdefault(shard, {})[name] = value.to(keep)
    weight_map, total = {}, 0
    for shard, tensors in groups.items():
        fname = f"model-{shard}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, fname))
        weight_map.update({k: fname for k in tensors})
        total += os.path.getsize(os.path.join(path, fname))
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    return total


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def measure_load(load, path: str):
    """(model, peak RSS increase in bytes during `load()`), after a warm-up: the first load in a process
    pays ~190 MiB of one-time imports and library initialisation, which is not the load's, so builtin:tiny
    is loaded once and a tensor of the checkpoint read first."""
    import gc

    from safetensors import safe_open

    import runtime
    from runtime.model.hf_checkpoint import checkpoint_files

    runtime.load_model("builtin:tiny")
    name, fp = next(iter(checkpoint_files(path).items()))
    with safe_open(fp, framework="pt") as f:
        f.get_slice(name)[:1]
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model = load()
    return model, _status("VmHWM") - before


def share_bytes(model, path: str) -> int:
    """Checkpoint bytes of the parts this rank holds (its slices of every tensor it reads, with scales)."""
    from safetensors import safe_open

    from parallel.shard import sharded_select
    from runtime.model.hf_checkpoint import checkpoint_files, map_name

    files, select = checkpoint_files(path), sharded_select(model)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    total = 0
    for name, fp in files.items():
        base = name.removesuffix("_scale_inv")
        mapped = map_name(base, model.config.num_hidden_layers)
        if mapped is None or not model.holds(mapped[0]) or mapped[0] not in params:
            continue
        with safe_open(fp, framework="pt") as f:
            sl = f.get_slice(name)
            shape, nbytes = sl.get_shape(), {"F8_E4M3": 1, "F32": 4, "BF16": 2}.get(sl.get_dtype(), 4)
        sel = select(mapped[0], mapped[1], tuple(shape))
        if sel is None:
            continue
        import torch

        total += torch.empty(tuple(shape), device="meta")[sel.index].numel() * nbytes
    return total


def rank_job(path: str, ref_file: str) -> None:
    """One rank of the pp=2 x ep=2 load (under mpirun): prints one JSON line."""
    import torch
    import torch.distributed as dist

    import cluster
    import runtime
    from parallel.pipeline import build
    from parallel.pipeline.stages import build_stages

    with cluster.init(pp=2, ep=2) as mesh:
        model, peak = measure_load(lambda: runtime.load_model(path, mesh, schedule="1f1b"), path)
        params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        stage = build_stages(model, build("1f1b", 2, 2), mesh.coord("pp"))[0]
        ids = torch.tensor([PROMPT], device=mesh.device)
        peer = mesh.ranks("pp")[1 - mesh.coord("pp")]
        err = None
        with torch.no_grad():
            if mesh.coord("pp") == 0:
                dist.send(stage(ids).contiguous(), peer, group=mesh.group("pp"))
            else:
                h = torch.empty(1, len(PROMPT), model.config.hidden_size, device=mesh.device)
                dist.recv(h, peer, group=mesh.group("pp"))
                logits = stage(h).float()
                ref = torch.load(ref_file, weights_only=True)
                err = float((logits - ref).abs().max())
        print("RANK " + json.dumps({"rank": mesh.rank, "pp": mesh.coord("pp"), "ep": mesh.coord("ep"),
                                    "share": share_bytes(model, path), "params": params, "peak": peak,
                                    "err": err}), flush=True)


def single_job(path: str, ref_file: str) -> None:
    import torch

    import runtime

    model, peak = measure_load(lambda: runtime.load_model(path), path)
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        torch.save(model.logits(torch.tensor([PROMPT])), ref_file)
    print("RANK " + json.dumps({"rank": "single", "share": share_bytes(model, path), "params": params,
                                "peak": peak, "err": 0.0}), flush=True)


def _rows(out: str) -> list[dict]:
    return [json.loads(line[5:]) for line in out.splitlines() if line.startswith("RANK ")]


def run(geometry: str, directory: str, timeout: float = 1800) -> tuple[list[dict], bool]:
    """Write (if needed) and load the checkpoint; returns the rows (single process first) and whether every
    bound and the parity held."""
    from launch.commands.launch_local import find_mpirun

    path = os.path.join(directory, f"ckpt-{geometry}")
    if not os.path.exists(os.path.join(path, "config.json")):
        t0 = time.perf_counter()
        size = write_checkpoint(path, geometry)
        print(f"wrote {path}: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)
    ref = os.path.join(directory, f"ref-{geometry}.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    me = [sys.executable, str(Path(__file__).resolve())]
    one = subprocess.run([*me, "--single", path, ref], env=env, capture_output=True, text=True, timeout=timeout)
    if one.returncode:
        raise RuntimeError(f"single-process load failed:\n{one.stdout[-2000:]}{one.stderr[-3000:]}")
    job = subprocess.run([find_mpirun(None), "-np", "4", "--oversubscribe", "--allow-run-as-root", *me,
                          "--rank", path, ref], env=env, capture_output=True, text=True, timeout=timeout)
    if job.returncode:
        raise RuntimeError(f"4-rank load failed:\n{job.stdout[-2000:]}{job.stderr[-3000:]}")
    rows = _rows(one.stdout) + sorted(_rows(job.stdout), key=lambda r: r["rank"])
    ok = True
    for r in rows:
        r["bound"] = r["params"] + r["share"] + OVERHEAD_MIB[geometry] * 2**20
        r["ok"] = r["peak"] <= r["bound"] and (r["err"] is None or r["err"] <= PARITY)
        ok = ok and r["ok"]
    return rows, ok


def print_table(rows: list[dict], geometry: str) -> None:
    mib = 2 ** 20
    print(f"{'rank':>6} {'pp':>3} {'ep':>3} {'share MiB':>10} {'params MiB':>11} {'peak RSS+ MiB':>14} "
          f"{'bound MiB':>10} {'logits err':>11}  ok")
    for r in rows:
        err = "-" if r["err"] is None else f"{r['err']:.2e}"
        print(f"{r['rank']:>6} {r.get('pp', '-'):>3} {r.get('ep', '-'):>3} {r['share'] / mib:>10.1f} "
              f"{r['params'] / mib:>11.1f} {r['peak'] / mib:>14.1f} {r['bound'] / mib:>10.1f} {err:>11}  "
              f"{'yes' if r['ok'] else 'NO'}")
    print(f"bound = params + share + {OVERHEAD_MIB[geometry]} MiB; logits parity {PARITY:g} (last-stage ranks)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="v3")
    p.add_argument("--dir", default=None, help="where the checkpoint is written (kept for reruns)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--rank", nargs=2, metavar=("CKPT", "REF"), help=argparse.SUPPRESS)
    p.add_argument("--single", nargs=2, metavar=("CKPT", "REF"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank:
        rank_job(*args.rank)
        return 0
    if args.single:
        single_job(*args.single)
        return 0
    import tempfile

    directory = args.dir or tempfile.mkdtemp(prefix="moerun-shard-")
    os.makedirs(directory, exist_ok=True)
    rows, ok = run(args.geometry, directory)
    if args.json:
        print(json.dumps({"rows": rows, "ok": ok}))
    else:
        print_table(rows, args.geometry)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
