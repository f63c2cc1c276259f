"""Checkpoint loading: FP8 blocks, MTP weights, the select hook, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hf_models import make_hf_model, random_ids

import runtime
from ops.fp8 import block_dequantize, block_quantize
from runtime.jobconfig import ConfigError
from runtime.model.hf_checkpoint import CheckpointError, Selection, load_checkpoint, save_hf_checkpoint
from runtime.model.loading import build_model


@pytest.fixture(scope="module")
def tiny():
    return runtime.load_model("builtin:tiny", seed=4)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    names = save_hf_checkpoint(tiny, path, max_shard_bytes=300_000)
    assert len(names) > 1
    return path


def test_round_trip_with_mtp(tiny, saved):
    index = json.load(open(os.path.join(saved, "model.safetensors.index.json")))["weight_map"]
    n = tiny.config.num_hidden_layers
    assert (
        f"model.layers.{n}.eh_proj.weight" in index and "model.layers.1.mlp.experts.3.up_proj.weight" in index
    )
    model = runtime.load_model(saved)
    assert len(model.mtp) == 1
    for (name, a), (_, b) in zip(tiny.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(2, 12, tiny.config.vocab_size, 0)
    with torch.no_grad():
        assert torch.equal(model(ids, ids)[1]["mtp"], tiny(ids, ids)[1]["mtp"])


def test_fp8_checkpoint_matches_dequantized_reference(tiny, tmp_path):
    save_hf_checkpoint(tiny, str(tmp_path), max_shard_bytes=200_000, fp8=True)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert "model.layers.2.mlp.experts.0.down_proj.weight_scale_inv" in index
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in index
    loaded = runtime.load_model(str(tmp_path))
    # Reference: the same model with every FP8-stored weight replaced by its block-dequantized self.
    ref = runtime.load_model("builtin:tiny", seed=4)
    with torch.no_grad():
        n_quant = 0
        for name, p in ref.named_parameters():
            mats = p.view(-1, *p.shape[-2:]) if "experts" in name else (p[None] if p.dim() == 2 else None)
            if mats is None or "gate.weight" in name or "embed" in name or "lm_head" in name:
                continue
            for m in mats:
                m.copy_(block_dequantize(*block_quantize(m)))
                n_quant += 1
    assert n_quant > 20
    for (name, a), (_, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(2, 10, tiny.config.vocab_size, 1)
    assert (loaded.logits(ids) - ref.logits(ids)).abs().max().item() < 1e-5
    assert (loaded.logits(ids) - tiny.logits(ids)).abs().max().item() > 1e-4  # quantization really happened


def test_transformers_checkpoint_turns_mtp_off_once(tmp_path, caplog):
    path, _ = make_hf_model(tmp_path, "deepseek_v3", seed=0)
    with caplog.at_level("WARNING", logger="moerun.checkpoint"):
        model = runtime.load_model(path)
    assert len(model.mtp) == 0
    assert sum("no MTP weights" in r.message for r in caplog.records) == 1


def test_select_hook_loads_a_slice(saved, tiny):
    """As an EP/TP loader would: experts 4..7 into local slots 0..3, the first half of q_b_proj."""
    cfg = tiny.config
    model = build_model(cfg)
    for layer in list(model.model.layers) + list(model.mtp):
        if layer.is_moe:
            ex = layer.mlp.experts
            for nm in ("gate_proj", "up_proj", "down_proj"):
                setattr(ex, nm, torch.nn.Parameter(torch.empty(4, *getattr(ex, nm).shape[1:])))
        attn = layer.self_attn
        attn.q_b_proj.weight = torch.nn.Parameter(
            torch.empty(attn.q_b_proj.weight.shape[0] // 2, attn.q_b_proj.weight.shape[1])
        )
    calls = []

    def select(name, expert, shape):
        calls.append(name)
        if expert is not None:
            return Selection((), expert - 4) if 4 <= expert < 8 else None
        if name.endswith("q_b_proj.weight"):
            return Selection((slice(0, shape[0] // 2),))
        return Selection()

    load_checkpoint(model, saved, select=select)
    assert torch.equal(
        model.model.layers[1].mlp.experts.up_proj, tiny.model.layers[1].mlp.experts.up_proj[4:8]
    )
    half = tiny.model.layers[0].self_attn.q_b_proj.weight.shape[0] // 2
    assert torch.equal(
        model.model.layers[0].self_attn.q_b_proj.weight, tiny.model.layers[0].self_attn.q_b_proj.weight[:half]
    )
    assert any("experts" in c for c in calls)


# --- errors ---


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard(saved, tmp_path):
    path = _copy(saved, tmp_path / "c")
    victim = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim}"):
        runtime.load_model(path)


def test_truncated_file(saved, tmp_path):
    path = _copy(saved, tmp_path / "c")
    victim = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        runtime.load_model(path)
    assert os.path.basename(victim) in str(e.value)


def test_wrong_shape(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(saved, tmp_path / "c")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    fp = os.path.join(path, index[name])
    tensors = load_file(fp)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, fp)
    with pytest.raises(CheckpointError, match=rf"{name}.*{index[name]}.*shape"):
        runtime.load_model(path)


def test_missing_and_unexpected_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(saved, tmp_path / "c")
    idx_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(idx_path))
    name = "model.layers.2.mlp.experts.5.gate_proj.weight"
    fp = os.path.join(path, index["weight_map"][name])
    tensors = load_file(fp)
    tensors["model.layers.2.mlp.bogus.weight"] = tensors.pop(name)
    save_file(tensors, fp)
    index["weight_map"]["model.layers.2.mlp.bogus.weight"] = index["weight_map"].pop(name)
    json.dump(index, open(idx_path, "w"))
    with pytest.raises(
        CheckpointError, match=r"unexpected.*model\.layers\.2\.mlp\.bogus\.weight.*safetensors"
    ):
        runtime.load_model(path)
    del index["weight_map"]["model.layers.2.mlp.bogus.weight"]
    json.dump(index, open(idx_path, "w"))
    with pytest.raises(
        CheckpointError, match=r"missing.*model\.layers\.2\.mlp\.experts\.5\.gate_proj\.weight"
    ):
        runtime.load_model(path)


def test_unknown_model_type_and_bad_fields(saved, tmp_path):
    path = _copy(saved, tmp_path / "c")
    cfg_path = os.path.join(path, "config.json")
    raw = json.load(open(cfg_path))
    json.dump(dict(raw, model_type="llama"), open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="model_type.*llama"):
        runtime.load_model(path)
    json.dump(dict(raw, topk_group=9), open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="topk_group"):
        runtime.load_model(path)
    json.dump(dict(raw, rope_parameters={"rope_type": "longrope"}), open(cfg_path, "w"))
    with pytest.raises(ConfigError, match="rope"):
        runtime.load_model(path)
