"""HF safetensors checkpoints -> DeepseekModel, tensor by tensor.

* Single `model.safetensors` or sharded with `model.safetensors.index.json`; every shard the index names must
  exist before anything is read. Tensors are read into the model's parameters in bands of rows (at most
  BAND_BYTES of checkpoint data at a time), only the part this rank owns.
* FP8 e4m3 weights with 128x128 `weight_scale_inv` are dequantized on load (ops.fp8.block_dequantize), block
  row by block row and only the blocks covering the owned rows and columns, then cast to the parameter's
  dtype (`e_score_correction_bias` stays fp32).
* A model built with only some pipeline stages (`model.holds(name)` False for the rest) skips the others.
* Name mapping (see runtime/model/deepseek.py): per-expert tensors go into slot e of the stacked expert parameters;
  layer index `num_hidden_layers + k` is MTP module k; the MTP copies of embed_tokens / shared_head.head are
  skipped (the model shares its own). A checkpoint without MTP weights (transformers writes none) loads with
  MTP off, and says so once.
* Missing, unexpected or wrongly shaped tensors, truncated files and missing shards are CheckpointErrors that
  name the tensor and the file.
* `select(name, expert, shape) -> Selection | None` lets a parallel loader take only its slice: `name` is the
  model parameter name, `expert` the checkpoint's global expert id (None for other tensors), `shape` the full
  checkpoint shape. Return None to skip the tensor (not held by this rank), or a Selection whose `index`
  (a tuple of slices, read lazily through safetensors' get_slice) and `slot` (the local expert slot) say what
  to read and where it goes. The model's own (possibly sharded) parameter shapes are what is checked.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ops.fp8 import block_dequantize

log = logging.getLogger("moerun.checkpoint")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def chmod_as_umask(path: str) -> None:
    """safetensors writes through a private temporary file (mode 0600); give a weight file the mode an
    ordinary open() gives the JSON beside it (0666 less the umask), so others can read what the umask allows."""
    mask = os.umask(0o077)  # the only portable way to read the umask is to set it
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor and the file."""


@dataclass
class Selection:
    """What part of a checkpoint tensor to read (`index`, slices of the full tensor) and, for an expert
    tensor, which local slot of the stacked parameter receives it."""

    index: tuple = ()
    slot: int | None = None


Select = Callable[[str, "int | None", tuple], "Selection | None"]


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    tensors_loaded: int = 0
    tensors_skipped: int = 0
    mtp_loaded: bool = False
    notes: list[str] = field(default_factory=list)


def map_name(name: str, num_hidden_layers: int) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (model parameter name, expert id or None); None for tensors to skip."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.match(name)
    if m and int(m.group(1)) >= num_hidden_layers:
        k, rest = int(m.group(1)) - num_hidden_layers, m.group(2)
        if rest in _MTP_SHARED:
            return None
        em = _EXPERT_RE.match(f"model.layers.0.{rest}")
        if em:
            return f"mtp.{k}.mlp.experts.{em.group(3)}", int(em.group(2))
        return f"mtp.{k}.{rest}", None
    em = _EXPERT_RE.match(name)
    if em:
        return f"{em.group(1)}.{em.group(3)}", int(em.group(2))
    return name, None


def checkpoint_files(path: str) -> dict[str, str]:
    """tensor name -> file path, from the index or each file's header; checks every shard exists."""
    from safetensors import safe_open

    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        for fname in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, fname)):
                tensor = next(k for k, v in weight_map.items() if v == fname)
                raise CheckpointError(
                    f"missing shard {os.path.join(path, fname)} (named by {index} for tensor "
                    f"{tensor!r} and others)"
                )
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = (
        [os.path.join(path, SINGLE_NAME)]
        if os.path.exists(os.path.join(path, SINGLE_NAME))
        else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    )
    if not files:
        raise CheckpointError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors files")
    out: dict[str, str] = {}
    for fp in files:
        try:
            with safe_open(fp, framework="pt") as f:
                for k in f.keys():
                    out[k] = fp
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
            raise CheckpointError(
                f"{fp}: cannot read safetensors header (truncated or corrupt file?): {e}"
            ) from None
    return out


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and persistent buffers by name (tied aliases included)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for name, b in model.named_buffers(remove_duplicate=False):
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf not in mod._non_persistent_buffers_set:
            out[name] = b
    return out


def load_checkpoint(model: nn.Module, path: str, select: Select | None = None) -> LoadReport:
    """Fill `model` (a runtime.model.deepseek.DeepseekModel) from the HF checkpoint directory `path`."""
    from safetensors import safe_open

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    files = checkpoint_files(path)
    report = LoadReport(files=sorted(set(files.values())))
    has_mtp = any(_is_mtp(n, n_layers) for n in files)
    if getattr(model, "mtp_depth", len(model.mtp)) and not has_mtp:  # the same decision on every pp rank
        msg = (
            f"{path}: checkpoint has no MTP weights (layer {n_layers}); multi-token prediction is off "
            "for this model"
        )
        log.warning(msg)
        report.notes.append(msg)
        model.mtp = nn.ModuleList()
        model.mtp_depth = 0
    report.mtp_loaded = bool(len(model.mtp))
    targets = _targets(model)
    holds = getattr(model, "holds", lambda name: True)  # pipeline: only this rank's stages are built
    filled: dict[int, set] = {}  # id(tensor) -> filled slots (None for whole tensor)

    by_file: dict[str, list[str]] = {}
    for name, fp in files.items():
        if not name.endswith("weight_scale_inv"):
            by_file.setdefault(fp, []).append(name)

    unexpected: list[str] = []
    for fp in sorted(by_file):
        try:
            handle = safe_open(fp, framework="pt")
        except Exception as e:
            raise CheckpointError(f"{fp}: cannot open (truncated or corrupt file?): {e}") from None
        with handle as f:
            present = set(f.keys())
            for name in sorted(by_file[fp]):
                if name not in present:
                    raise CheckpointError(f"tensor {name!r}: the index names {fp}, which does not contain it")
                mapped = map_name(name, n_layers)
                if mapped is None:
                    report.tensors_skipped += 1
                    continue
                pname, expert = mapped
                if (pname.startswith("mtp.") and not len(model.mtp)) or not holds(pname):
                    report.tensors_skipped += 1  # MTP off, or a part another pipeline rank holds
                    continue
                if pname not in targets:
                    unexpected.append(f"{name!r} in {fp}")
                    continue
                sl = f.get_slice(name)
                full_shape = tuple(sl.get_shape())
                sel = Selection((), expert) if select is None else select(pname, expert, full_shape)
                if sel is None:
                    report.tensors_skipped += 1
                    continue
                dst = targets[pname]
                if expert is not None:
                    if sel.slot is None or not 0 <= sel.slot < dst.shape[0]:
                        raise CheckpointError(
                            f"tensor {name!r} in {fp}: expert {expert} maps to slot {sel.slot}, "
                            f"but {pname} holds {dst.shape[0]} experts"
                        )
                    dst_view = dst[sel.slot]
                else:
                    dst_view = dst
                want = (
                    tuple(torch.empty(full_shape, device="meta")[sel.index].shape)
                    if sel.index
                    else full_shape
                )
                if want != tuple(dst_view.shape):
                    raise CheckpointError(
                        f"tensor {name!r} in {fp}: shape {want} does not match parameter "
                        f"{pname}{'' if expert is None else f'[{sel.slot}]'} {tuple(dst_view.shape)}"
                    )
                with torch.no_grad():
                    _fill(dst_view, f, sl, name, fp, files, sel.index, full_shape)
                filled.setdefault(id(dst), set()).add(sel.slot if expert is not None else None)
                report.tensors_loaded += 1
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensors not in the model: {', '.join(unexpected[:5])}{more}")
    _check_missing(model, targets, filled, path)
    return report


def _is_mtp(name: str, n_layers: int) -> bool:
    m = _LAYER_RE.match(name)
    return bool(m) and int(m.group(1)) >= n_layers


BAND_BYTES = 64 << 20  # what one read holds at a time beside its destination (checkpoint bytes)
FP8_BLOCK = 128


def _fill(dst: torch.Tensor, f, sl, name: str, fp: str, files: dict[str, str], index: tuple,
          shape: tuple) -> None:
    """Copy the part `index` (slices of the full tensor of `shape`) of checkpoint tensor `name` into `dst`,
    reading it in bands of rows of at most BAND_BYTES, so nothing beyond the owned part is read and no
    copy of the whole owned part is made; FP8 tensors are dequantised 128x128 block by block, only the
    blocks that cover the owned rows and columns."""
    try:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [ix.indices(n)[:2] for ix, n in zip(index, shape, strict=True)]
        if sl.get_dtype() in ("F8_E4M3", "F8_E4M3FN"):
            _fill_fp8(dst, f, sl, name, fp, files, bounds, shape)
            return
        if len(shape) < 2:
            dst.copy_(sl[index] if index else f.get_tensor(name))
            return
        (r0, r1), rest = bounds[0], tuple(slice(a, b) for a, b in bounds[1:])
        row_bytes = max(1, dst[0].numel() * _itemsize(sl.get_dtype())) if r1 > r0 else 1
        band = max(1, BAND_BYTES // row_bytes)
        for r in range(r0, r1, band):
            e = min(r1, r + band)
            dst[r - r0:e - r0].copy_(sl[(slice(r, e), *rest)])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"tensor {name!r} in {fp}: cannot read (truncated or corrupt file?): {e}"
        ) from None


def _fill_fp8(dst: torch.Tensor, f, sl, name: str, fp: str, files: dict[str, str], bounds: list,
              shape: tuple) -> None:
    from safetensors import safe_open

    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise CheckpointError(f"tensor {name!r} in {fp} is float8 but {scale_name!r} is missing")
    if len(shape) != 2:
        raise CheckpointError(f"tensor {name!r} in {fp}: float8 block scales need a 2-D tensor, got {shape}")
    if files[scale_name] == fp:
        scale = f.get_tensor(scale_name)
    else:
        with safe_open(files[scale_name], framework="pt") as g:
            scale = g.get_tensor(scale_name)
    (r0, r1), (c0, c1) = bounds
    blk = FP8_BLOCK
    cb0, cb1 = c0 // blk, -(-c1 // blk)
    ca, cb = cb0 * blk, min(shape[1], cb1 * blk)
    band = max(1, BAND_BYTES // max(1, (cb - ca) * blk * 4))  # block rows per band (fp32 after dequant)
    for b in range(r0 // blk, -(-r1 // blk), band):
        qa, qb = b * blk, min(shape[0], (b + band) * blk)
        w = block_dequantize(sl[qa:qb, ca:cb], scale[b:b + band, cb0:cb1])
        a, e = max(r0, qa), min(r1, qb)
        dst[a - r0:e - r0].copy_(w[a - qa:e - qa, c0 - ca:c1 - ca])


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}.get(dtype, 1)


def checkpoint_name(pname: str, num_hidden_layers: int, expert: int | None = None) -> str:
    """Inverse of `map_name`: the HF checkpoint name of a model parameter (and global expert id)."""
    if pname.startswith("mtp."):
        k, rest = pname[4:].split(".", 1)
        pname = f"model.layers.{num_hidden_layers + int(k)}.{rest}"
    m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", pname)
    if m and expert is not None:
        return f"{m.group(1)}.{expert}.{m.group(2)}.weight"
    return pname


def _check_missing(
    model: nn.Module, targets: dict[str, torch.Tensor], filled: dict[int, set], path: str
) -> None:
    n = model.config.num_hidden_layers
    offsets = {}
    for m in model.modules():
        if hasattr(m, "expert_offset"):
            for t in (m.gate_proj, m.up_proj, m.down_proj):
                offsets[id(t)] = m.expert_offset
    missing = []
    seen: set[int] = set()
    for name, t in targets.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        got = filled.get(id(t), set())
        if id(t) in offsets:
            missing += [
                checkpoint_name(name, n, offsets[id(t)] + s) for s in range(t.shape[0]) if s not in got
            ]
        elif None not in got:
            missing.append(checkpoint_name(name, n))
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:8])}{more}")


def hf_tensors(named: Iterable[tuple[str, torch.Tensor]], num_hidden_layers: int, tied: bool = False
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Runtime names -> HF checkpoint names (the inverse of `map_name`): stacked experts split into one
    tensor per expert (views of the stack), MTP module k at layer num_hidden_layers + k; a tied LM head is
    left out (the embedding holds it)."""
    for name, t in named:
        if tied and name == "lm_head.weight":
            continue
        if re.search(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", name):
            for e in range(t.shape[0]):
                yield checkpoint_name(name, num_hidden_layers, e), t[e]
        else:
            yield checkpoint_name(name, num_hidden_layers), t


def hf_state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) of a whole model in the HF layout, with the copies of embed_tokens /
    shared_head.head that DeepSeek's checkpoints carry for each MTP layer."""
    n = model.config.num_hidden_layers
    yield from hf_tensors(_targets(model).items(), n, model.config.tie_word_embeddings)
    for k in range(len(model.mtp)):
        yield f"model.layers.{n + k}.embed_tokens.weight", model.model.embed_tokens.weight
        yield f"model.layers.{n + k}.shared_head.head.weight", model.lm_head.weight


def _fp8_candidate(name: str, t: torch.Tensor) -> bool:
    """Decoder-layer linear weights are FP8 in DeepSeek-V3 (not norms, router, embeddings, head)."""
    skip = ("mlp.gate.weight", "embed_tokens.weight", "shared_head.head.weight")
    return (
        t.dim() == 2 and name.startswith("model.layers.") and not name.endswith(skip) and "norm" not in name
    )


def save_hf_checkpoint(
    model: nn.Module, path: str, max_shard_bytes: int = 1 << 30, fp8: bool = False
) -> list[str]:
    """Write `model` as an HF checkpoint directory (config.json + sharded safetensors + index) that
    `load_checkpoint` and transformers read. `fp8=True` stores linear weights as float8_e4m3fn with 128x128
    `weight_scale_inv`, the DeepSeek-V3 release layout. Returns the shard file names."""
    from safetensors.torch import save_file

    from ops.fp8 import block_quantize

    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state_items(model):
        tensors = {name: t.detach().contiguous().cpu()}
        if fp8 and _fp8_candidate(name, t):
            q, s = block_quantize(t.detach().float().cpu())
            tensors = {name: q, name + "_scale_inv": s}
        nbytes = sum(x.numel() * x.element_size() for x in tensors.values())
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update({k: v.clone() for k, v in tensors.items()})
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        chmod_as_umask(os.path.join(path, fname))
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=1)
    return names
