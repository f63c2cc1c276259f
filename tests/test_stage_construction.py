"""A rank builds only what it owns: its pipeline stages' layers (both under DualPipe(V)), its TP slices, its
experts, the embedding / head where its stages have them; builtin weights are the same under every layout
and are drawn without ever making a full tensor of a sharded weight; checkpoint loading reads only the
owned parts. Ranks of large jobs are built in this process over torch's fake process group."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.fake import fake_mesh
from parallel.pipeline.stages import layer_split
from parallel.shard import shard_marks, to_local
from runtime.model.builtin import builtin_config
from runtime.model.loading import build_model, load_model
from tests.hf_models import make_hf_model

V3 = builtin_config("builtin:deepseek-v3")


def _v3_share(pp: int, ep: int, kind: str, pp_rank: int) -> int:
    """DeepSeek-V3's parameters on one rank, from the published config numbers alone: attention, norms,
    dense MLP, router, this rank's routed experts, shared expert, per held layer; embedding on the first
    stage, final norm, head and the MTP module (a MoE layer, its two input norms, its 2h -> h projection and
    its own final norm; embedding and head shared) on the last."""
    h, heads, q_rank, kv_rank, nope, rope, v = 7168, 128, 1536, 512, 128, 64, 128
    attn = (h * q_rank + q_rank + q_rank * heads * (nope + rope) + h * (kv_rank + rope) + kv_rank
            + kv_rank * heads * (nope + v) + heads * v * h)
    norms = 2 * h
    dense_mlp = 3 * h * 18432
    moe_mlp = 256 * h + 256 // ep * 3 * h * 2048 + 3 * h * 2048  # router, local experts, shared expert
    moe_bias = 256  # e_score_correction_bias (a buffer, counted apart)
    stages = 2 * pp if kind == "dualpipev" else pp
    split = layer_split(61, stages)
    held = {"1f1b": [pp_rank], "dualpipe": [pp_rank, pp - 1 - pp_rank],
            "dualpipev": [pp_rank, 2 * pp - 1 - pp_rank]}[kind]
    total = 0
    for s in set(held):
        for i in split[s]:
            total += attn + norms + (dense_mlp if i < 3 else moe_mlp + moe_bias)
        if s == 0:
            total += 129280 * h
        if s == stages - 1:
            total += h + 129280 * h
            total += attn + norms + moe_mlp + moe_bias + 2 * h + 2 * h * h + h  # MTP module
    return total


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
def test_deepseek_v3_rank_of_2048_materialises_its_share(kind):
    """DeepSeek-V3 at pp=16 x ep=64 (2048 ranks; dualpipev: pp=8 x ep=64 x dp=4 over 2048 ranks' worth of
    stages) on the meta device: for a first, a middle and a last pipeline rank, the parameters the model
    holds number exactly that rank's share, computed independently from the config."""
    pp = 8 if kind == "dualpipev" else 16
    for pp_rank in (0, pp // 2, pp - 1):
        rank = pp_rank * (2048 // pp) + 5
        with fake_mesh(2048, rank, pp=pp, ep=64) as mesh:
            from parallel.expert import Dispatcher
            from parallel.pipeline.stages import held_parts

            parts = held_parts(61, kind, pp, mesh.coord("pp"))
            model = build_model(V3, torch.bfloat16, mtp=True, materialize=False, parts=parts,
                                dispatcher=Dispatcher.from_mesh(mesh, 256))
            count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
            assert all(p.is_meta for p in model.parameters())
            for i in parts.layers:
                if i >= 3:  # MoE layers: this rank's 4 of 256 experts
                    experts = model.model.layers[i].mlp.experts
                    assert experts.gate_proj.shape[0] == 4 and experts.expert_offset == 4 * (rank % 64)
        assert count == _v3_share(pp, 64, kind, pp_rank), (kind, pp_rank)


class _TensorSizes(TorchDispatchMode):
    """(storage address, elements) of every real tensor an op takes or makes (meta tensors allocate
    nothing and are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.seen.append((t.untyped_storage().data_ptr(), t.numel()))
        return out


def _layouts():
    return [dict(world=4, pp=2, ep=2, kind="1f1b"), dict(world=4, pp=2, tp=2, kind="dualpipev"),
            dict(world=4, tp=2, ep=2, kind="1f1b"), dict(world=8, pp=2, tp=2, ep=2, kind="dualpipe")]


@pytest.mark.parametrize("source", ["builtin", "checkpoint"])
def test_every_layout_gets_the_single_process_weights(tmp_path, source):
    """Every rank of pp x tp x ep layouts (built in this process over the fake process group) holds exactly
    its slice of the single-process model, for builtin:tiny (per-row seeded init) and for an HF checkpoint
    (read slice by slice). The init never makes a tensor larger than one row of a TP-split weight beyond
    the rank's own parameters, and a rank's names are only its stages'."""
    if source == "builtin":
        path = "builtin:tiny"
    else:
        path = str(make_hf_model(tmp_path / "hf", "deepseek_v3", seed=2, num_hidden_layers=4,
                                 num_nextn_predict_layers=0)[0])
    ref = load_model(path, mtp=False)
    full = dict(ref.named_parameters()) | dict(ref.named_buffers())
    for lay in _layouts():
        seen: set[str] = set()
        for rank in range(lay["world"]):
            with fake_mesh(lay["world"], rank, pp=lay.get("pp", 1), tp=lay.get("tp", 1), ep=lay.get("ep", 1),
                           ranks_per_node=lay["world"]) as mesh:
                model = load_model(path, mesh, mtp=False, schedule=lay["kind"])
                marks = shard_marks(model)
                names = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers()
                                                          if not n.endswith("weight") or b.numel()}
                for name, t in names.items():
                    want = to_local(full[name], marks.get(name, {}), t.shape)
                    assert torch.equal(t, want), (lay, rank, name)
                    seen.add(name)
                if source == "builtin" and rank == lay["world"] - 1:
                    mode = _TensorSizes()
                    with mode:
                        again = load_model(path, mesh, mtp=False, schedule=lay["kind"])
                    own = {t.untyped_storage().data_ptr() for t in [*again.parameters(), *again.buffers()]}
                    largest = max(n for ptr, n in mode.seen if ptr not in own)
                    assert largest <= max(t.shape[-1] for t in ref.parameters()), (lay, largest)  # one row
                if lay.get("pp", 1) > 1 and lay["kind"] != "dualpipe":  # (DualPipe at pp=2: both stages)
                    held = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
                    assert len(held) < ref.config.num_hidden_layers
        assert seen == set(full), (lay, set(full) - seen)
