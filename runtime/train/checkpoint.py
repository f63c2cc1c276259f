"""Training checkpoints: atomic, layout-independent, HF-loadable; resume, reshard, export.

A checkpoint `<out>/ckpt/step-N/` holds
* `config.json` + `model-ppK-of-P.safetensors` + `model.safetensors.index.json`: the model in FULL
  (unsharded) shapes with HF tensor names (per-expert tensors, MTP at layer num_hidden_layers + k), in the
  model's dtype; the directory is itself an HF model directory (`runtime.load_model(step_dir)` works, and
  loading it under any layout reshards through the checkpoint loader's `select` hook);
* `optim-ppK.safetensors`: fp32 master weights and both Adam moments, `{master,exp_avg,exp_avg_sq}.NAME`
  with the runtime's parameter names (stacked experts), also in full shapes;
* `manifest.json`: step, layout, data position, RNG state, config and its hash (written last).

Atomicity: everything goes to `ckpt/.tmp-step-N/` (each file fsynced), then rank 0 writes the manifest,
fsyncs, renames the directory to `step-N` and only then replaces the `latest` pointer (write + fsync +
os.replace). A kill at any moment leaves either the previous `latest` or the new one, never a half
checkpoint under a `step-N` name. Re-saving an existing step moves the old one aside (`.old-step-N`) and
deletes it only once the new one is in place; a failed rename puts it back, and readers fall back to it.
Requires a file system all writers share (one writer per pipeline stage). Nothing is ever unpickled:
tensors are safetensors, the rest JSON.

A save that fails on any rank (a full disk, a permission) fails on every rank alike: each phase ends with
an agreement over the control group, so all ranks raise `CheckpointSaveError` at the same point and stay in
step; the half-written `.tmp-step-N` is removed and nothing that existed before is lost.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from parallel.shard import to_full, to_local
from runtime.model.hf_checkpoint import INDEX_NAME, CheckpointError, chmod_as_umask, hf_tensors

FORMAT = "moerun-train-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
OPT_KINDS = ("master", "exp_avg", "exp_avg_sq")
_STEP_RE = re.compile(r"^step-(\d+)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Keys that may change between a run and its resumption without changing what is being trained.
_HASH_SKIP = {"train": ("steps", "resume", "save_every", "out")}


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (on this rank or another); raised on every rank alike."""


def config_hash(config: dict) -> str:
    """sha256 of the model/data/train config (minus run-length and bookkeeping keys)."""
    picked = {k: dict(config[k]) for k in ("model", "data", "train") if k in config}
    for sec, keys in _HASH_SKIP.items():
        for k in keys:
            picked.get(sec, {}).pop(k, None)
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# --- files -------------------------------------------------------------------------------------------------
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # pragma: no cover - some file systems cannot fsync directories
        pass


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    chmod_as_umask(path)
    _fsync_file(path)


def with_mtp_held(hf_config: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """`hf_config` saying as many MTP modules (layers num_hidden_layers + k) as the tensors `names` hold: a
    model trained without its MTP module (pp > 1, or mtp_loss_coef = 0) must not claim one."""
    n = hf_config["num_hidden_layers"]
    held = {int(m.group(1)) for name in names if (m := _LAYER_RE.match(name)) and int(m.group(1)) >= n}
    return {**hf_config, "num_nextn_predict_layers": len(held)}


def _crash_hook(step: int, where: str) -> None:
    """Test hook: MOERUN_TEST_CRASH_IN_CKPT=N kills this process at step N's checkpoint, after the tensor
    files are written and before the manifest/rename (`where` = "mid-write"): a deterministic torn write."""
    if os.environ.get("MOERUN_TEST_CRASH_IN_CKPT") == str(step) and where == "mid-write":
        os._exit(17)


def save_checkpoint(out: str, step: int, *, params: list[tuple[str, torch.Tensor]],
                    buffers: list[tuple[str, torch.Tensor]], marks: dict[str, dict],
                    optim_state: dict[str, dict[str, torch.Tensor]], model_config: Any,
                    manifest: dict[str, Any], mesh=None, tokenizer_source: str | None = None) -> str:
    """Write `<out>/ckpt/step-N` atomically. Collective: every rank calls it (optim_state comes from
    ZeroAdamW.full_state(), itself collective). Returns the checkpoint directory."""
    quiet = getattr(mesh, "quiet", None)  # writing may keep a rank out of collectives for long: not hung
    with quiet(f"writing checkpoint step-{step}") if quiet is not None else contextlib.nullcontext():
        return _save(out, step, params, buffers, marks, optim_state, model_config, manifest, mesh,
                     tokenizer_source)


def _save(out, step, params, buffers, marks, optim_state, model_config, manifest, mesh, tokenizer_source) -> str:
    control = mesh.group("control") if mesh is not None and mesh.world_size > 1 else None
    tp_group = mesh.group("tp") if mesh is not None else None
    ep_group = mesh.group("ep") if mesh is not None else None
    rank = mesh.rank if mesh is not None else 0
    pp_rank, pp = (mesh.coord("pp"), mesh.size("pp")) if mesh is not None else (0, 1)
    writer = mesh is None or (mesh.coord("dp") == 0 and mesh.coord("tp") == 0)
    root = os.path.join(out, "ckpt")
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    agree = _Agreement(control, rank, step, tmp)
    with agree.phase():
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            for stale in os.listdir(root):  # torn writes of a killed run (never read: no manifest)
                if stale.startswith(".tmp-step-"):
                    shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
            os.makedirs(tmp)

    # Gather to full shapes (collective over tp / ep), then one writer per pipeline stage writes.
    full_params = [(n, to_full(t.detach(), marks.get(n, {}), tp_group, ep_group)) for n, t in params]
    opt: dict[str, torch.Tensor] = {}
    for name, kinds in optim_state.items():
        info = marks.get(name, {})
        for kind in OPT_KINDS:
            opt[f"{kind}.{name}"] = to_full(kinds[kind], info, tp_group, ep_group)
    with agree.phase():
        if writer:
            tensors = {k: t.clone() for k, t in hf_tensors(full_params + [(n, b.detach()) for n, b in buffers],
                                                           model_config.num_hidden_layers,
                                                           model_config.tie_word_embeddings)}  # no shared storage
            _save_tensors(tensors, os.path.join(tmp, f"model-pp{pp_rank:03d}-of-{pp:03d}.safetensors"))
            _save_tensors(opt, os.path.join(tmp, f"optim-pp{pp_rank:03d}.safetensors"))
    with agree.phase():
        if rank == 0:
            _crash_hook(step, "mid-write")
            from runtime.model.tokenizer_files import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_source, tmp)
            _finish(tmp, final, root, step, model_config, manifest)
    return final


class _Agreement:
    """Ends each phase of a save with every rank knowing whether any rank failed in it (a MAX all-reduce of
    a flag over the control group, which also synchronises the ranks like a barrier). On a failure every
    rank raises CheckpointSaveError, and rank 0 removes the half-written directory."""

    def __init__(self, group, rank: int, step: int, tmp: str) -> None:
        self.group, self.rank, self.step, self.tmp = group, rank, step, tmp

    @contextlib.contextmanager
    def phase(self):
        error: BaseException | None = None
        try:
            yield
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            error = e
        failed = error is not None
        if self.group is not None:
            flag = torch.tensor([int(failed)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            failed = bool(flag.item())
        if failed:
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            why = f"{type(error).__name__}: {error}" if error is not None else "another rank could not write its part"
            raise CheckpointSaveError(f"checkpoint step-{self.step} not saved (rank {self.rank}: {why})") from error


def _finish(tmp: str, final: str, root: str, step: int, model_config: Any, manifest: dict) -> None:
    from safetensors import safe_open

    weight_map = {}
    for fname in sorted(os.listdir(tmp)):
        if fname.startswith("model-") and fname.endswith(".safetensors"):
            with safe_open(os.path.join(tmp, fname), framework="pt") as f:
                weight_map.update({k: fname for k in f.keys()})
    _write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), with_mtp_held(model_config.to_hf_dict(), weight_map))
    _write_json(os.path.join(tmp, MANIFEST), {"format": FORMAT, "step": step, **manifest})
    _fsync_dir(tmp)
    old = None
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): the old one stays until replaced
        old = os.path.join(root, f".old-step-{step}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_dir(root)
    pointer = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(f"step-{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(root, LATEST))
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------------------
def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint under `<out>/ckpt` (the `latest` pointer, else the highest complete
    step-N), or None. Directories without a manifest (torn writes) are never returned."""
    root = os.path.join(out, "ckpt")
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if _STEP_RE.match(name) and is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
        if _STEP_RE.match(name) and is_complete(os.path.join(root, f".old-{name}")):
            return os.path.join(root, f".old-{name}")  # killed while re-saving that step: the old copy
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_RE.match(d))
                   and is_complete(os.path.join(root, d)))
    return os.path.join(root, steps[-1][1]) if steps else None


def resolve_checkpoint(path: str) -> str:
    """A step dir, a `ckpt` dir, or a run's out dir -> the step dir to read."""
    if is_complete(path):
        return path
    base = path.rstrip("/")
    found = latest_checkpoint(os.path.dirname(base) if os.path.basename(base) == "ckpt" else base)
    if found:
        return found
    raise CheckpointError(f"{path!r}: no complete checkpoint (a step-N dir with {MANIFEST}, a ckpt dir, "
                               "or a run directory containing ckpt/)")


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class OptimizerStateReader:
    """Reads `{kind}.{name}` full tensors from a checkpoint's optim files and slices them for this rank."""

    def __init__(self, path: str, marks: dict[str, dict], shapes: dict[str, torch.Size]) -> None:
        from safetensors import safe_open

        self.marks, self.shapes = marks, shapes
        self.files = {}
        for fname in sorted(os.listdir(path)):
            if fname.startswith("optim-") and fname.endswith(".safetensors"):
                handle = safe_open(os.path.join(path, fname), framework="pt")
                for k in handle.keys():
                    self.files[k] = handle
        if not self.files:
            raise CheckpointError(f"{path}: no optim-*.safetensors (optimizer state) files")
        self.path = path

    def __call__(self, name: str, kind: str) -> torch.Tensor:
        key = f"{kind}.{name}"
        if key not in self.files:
            raise CheckpointError(f"{self.path}: optimizer state {key!r} is missing (the checkpoint was "
                                       "written for a different model?)")
        return to_local(self.files[key].get_tensor(key), self.marks.get(name, {}), self.shapes[name])


def rng_state() -> dict[str, str]:
    return {"torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, str]) -> None:
    if "torch_cpu" in state:
        raw = base64.b64decode(state["torch_cpu"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def export_hf(src: str, dest: str, dtype: str | None = None) -> str:
    """Write the model of checkpoint `src` (step dir, ckpt dir or run dir) as a plain HF directory
    (config.json + model.safetensors) that transformers and runtime.load_model read."""
    from safetensors import safe_open

    step_dir = resolve_checkpoint(src)
    with open(os.path.join(step_dir, "config.json")) as f:
        hf_config = json.load(f)
    with open(os.path.join(step_dir, INDEX_NAME)) as f:
        weight_map = json.load(f)["weight_map"]
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[dtype]
    tensors = {}
    for fname in sorted(set(weight_map.values())):
        with safe_open(os.path.join(step_dir, fname), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if want is not None and t.is_floating_point() and not k.endswith("e_score_correction_bias"):
                    t = t.to(want)
                tensors[k] = t
    os.makedirs(dest, exist_ok=True)
    _save_tensors(tensors, os.path.join(dest, "model.safetensors"))
    hf_config = with_mtp_held(hf_config, tensors)
    if dtype is not None:
        hf_config["torch_dtype"] = dtype
        hf_config["dtype"] = dtype
    _write_json(os.path.join(dest, "config.json"), hf_config)
    from runtime.model.tokenizer_files import copy_tokenizer_files

    copy_tokenizer_files(step_dir, dest)
    return dest
