"""Absorbed vs expanded MLA in the full model, and incremental decode against a prefilled latent cache."""

from __future__ import annotations

import pytest
import torch
from hf_models import YARN, make_hf_model, random_ids

import runtime


@pytest.fixture(scope="module")
def hf_loaded(tmp_path_factory):
    path, _ = make_hf_model(
        tmp_path_factory.mktemp("v3dec"), "deepseek_v3", seed=7, q_lora_rank=None, rope_parameters=YARN
    )
    return runtime.load_model(path)


@pytest.fixture(params=["tiny", "hf_loaded"])
def model(request):
    return request.getfixturevalue(request.param)


@torch.no_grad()
def test_absorbed_equals_expanded_full_sequence(model):
    ids = random_ids(3, 19, model.config.vocab_size, 1)
    expanded = model.logits(ids)
    absorbed = model.decode(ids, model.new_cache(3, 32), absorbed=True)
    assert (absorbed - expanded).abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("prefill_absorbed", [False, True])
def test_incremental_decode_matches_full_forward(model, prefill_absorbed):
    b, prompt, steps = 2, 9, 6
    ids = random_ids(b, prompt + steps, model.config.vocab_size, 2)
    full = model.logits(ids)
    cache = model.new_cache(b, prompt + steps)
    out = [model.decode(ids[:, :prompt], cache, absorbed=prefill_absorbed)]
    assert cache.length == prompt
    for t in range(prompt, prompt + steps - 2):
        out.append(model.decode(ids[:, t : t + 1], cache, absorbed=True))
    out.append(
        model.decode(ids[:, prompt + steps - 2 :], cache, absorbed=True)
    )  # a 2-token chunk after decode
    got = torch.cat(out, dim=1)
    assert cache.length == prompt + steps
    assert (got - full).abs().max().item() < 1e-5


@torch.no_grad()
def test_cache_overflow_is_an_error(tiny):
    cache = tiny.new_cache(1, 4)
    tiny.decode(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache full"):
        tiny.decode(torch.zeros(1, 1, dtype=torch.long), cache)


@torch.no_grad()
def test_ops_absorbed_equals_expanded_random():
    """The two MLA forms on random tensors, with keys before the queries (a cache offset)."""
    from ops.mla import mla_absorbed, mla_expanded

    g = torch.Generator().manual_seed(0)
    b, t, off, h, dn, dr, dv, r = 2, 5, 7, 3, 16, 8, 12, 24
    q_nope, q_pe = torch.randn(b, t, h, dn, generator=g), torch.randn(b, t, h, dr, generator=g)
    latent, k_pe = torch.randn(b, off + t, r, generator=g), torch.randn(b, off + t, dr, generator=g)
    w = torch.randn(h * (dn + dv), r, generator=g) * 0.3
    for offset, s in ((0, t), (off, off + t)):
        lat, kp = latent[:, -s:], k_pe[:, -s:]
        e = mla_expanded(q_nope, q_pe, lat, kp, w, 0.2, q_offset=offset)
        a = mla_absorbed(q_nope, q_pe, lat, kp, w, 0.2, q_offset=offset)
        assert e.shape == (b, t, h, dv)
        assert (a - e).abs().max().item() < 1e-5
    # Query 0 at offset 0 sees only key 0: its output is exactly that key's per-head value.
    e = mla_expanded(q_nope, q_pe, latent[:, :t], k_pe[:, :t], w, 0.2)
    v0 = torch.nn.functional.linear(latent[:, 0], w).view(b, h, dn + dv)[..., dn:]
    assert torch.allclose(e[:, 0], v0, atol=1e-6)
