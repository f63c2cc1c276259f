"""Paged latent cache: layout helpers and the torch decode twin against the model's absorbed MLA.

The Triton decode kernel is checked against this twin in tests/test_triton_kernels.py."""

from __future__ import annotations

import pytest
import torch

from ops.mla import absorb_query, mla_absorbed, split_kv_b
from ops.paged_attention import (
    gather_kv,
    mla_decode_paged,
    new_kv_pages,
    slot_mapping,
    write_kv,
)

R, DR = 32, 8


def _paged_batch(lens: list[int], page_size: int, dtype=torch.float32, seed: int = 0):
    """Random per-sequence caches written into shuffled pages; returns (kv_pages, table, lens, contiguous)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    max_pages = max(1, -(-max(lens) // page_size)) + 1  # one spare column of garbage
    num_pages = b * max_pages + 3
    kv = new_kv_pages(num_pages, page_size, R, DR, dtype)
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((b, max_pages), 10_000, dtype=torch.int32)  # garbage in unused entries
    t = max(lens)
    pos = torch.full((b, t), -1)
    lat = torch.zeros(b, t, R)
    kpe = torch.zeros(b, t, DR)
    used = 0
    for i, n in enumerate(lens):
        pages = -(-n // page_size)
        table[i, :pages] = perm[used : used + pages].int()
        used += pages
        pos[i, :n] = torch.arange(n)
        lat[i, :n] = torch.randn(n, R, generator=g)
        kpe[i, :n] = torch.randn(n, DR, generator=g)
    write_kv(kv, table, pos, lat.to(dtype), kpe.to(dtype))
    return kv, table, torch.tensor(lens, dtype=torch.int32), (lat, kpe)


def test_write_and_gather_roundtrip():
    kv, table, lens, (lat, kpe) = _paged_batch([5, 33, 16], page_size=16)
    for i, n in enumerate(lens.tolist()):
        c, k = gather_kv(kv, table[i], n, R)
        assert torch.equal(c, lat[i, :n]) and torch.equal(k, kpe[i, :n])
    # Token p of sequence b sits at kv_pages[table[b, p // ps], p % ps]: the documented layout.
    assert torch.equal(kv[table[1, 2], 33 - 32 - 1, :R], lat[1, 32])
    slots = slot_mapping(table, torch.tensor([[0, 17, -1]] * 3), 16)
    assert slots[1, 1] == table[1, 1] * 16 + 1 and (slots[:, 2] == -1).all()


def test_write_kv_rejects_bad_input():
    kv, table, _, _ = _paged_batch([4], page_size=16)
    with pytest.raises(ValueError, match="row width"):
        write_kv(kv, table, torch.tensor([[0]]), torch.zeros(1, 1, R + 1), torch.zeros(1, 1, DR))
    with pytest.raises(ValueError, match="block_table has only"):
        write_kv(kv, table, torch.tensor([[10_000]]), torch.zeros(1, 1, R), torch.zeros(1, 1, DR))


@pytest.mark.parametrize("page_size", [16, 64])
def test_torch_twin_matches_absorbed_mla(page_size):
    """Paged decode + W_UV equals ops.mla.mla_absorbed (and hence the expanded form) on the same cache."""
    lens = [1, 70, 33]
    kv, table, seq_lens, (lat, kpe) = _paged_batch(lens, page_size)
    h, dn, dv = 4, 16, 16
    g = torch.Generator().manual_seed(1)
    q_nope = torch.randn(3, 1, h, dn, generator=g)
    q_pe = torch.randn(3, 1, h, DR, generator=g)
    w = torch.randn(h * (dn + dv), R, generator=g) / 4
    w_uk, w_uv = split_kv_b(w, h, dn)
    out = mla_decode_paged(absorb_query(q_nope, w_uk)[:, 0], q_pe[:, 0], kv, table, seq_lens, 0.25)
    for i, n in enumerate(lens):
        ref = mla_absorbed(q_nope[i : i + 1], q_pe[i : i + 1], lat[i : i + 1, :n], kpe[i : i + 1, :n], w, 0.25,
                           q_offset=n - 1)
        got = torch.einsum("hr,hvr->hv", out[i], w_uv)
        torch.testing.assert_close(got, ref[0, 0], rtol=1e-5, atol=1e-5)


def test_torch_twin_matches_model_decode_step():
    """One decode step of builtin:tiny's first attention layer: LatentCache + absorbed MLA vs paged cache."""
    from runtime import load_model

    model = load_model("builtin:tiny")
    attn = model.model.layers[0].self_attn
    torch.manual_seed(0)
    x = torch.randn(2, 6, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(6), x.dtype)
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        attn(x[:, :5], cos[:5], sin[:5], cache.attention(absorbed=True), 0)
        cache.advance(5)
        ref = attn(x[:, 5:], cos[5:], sin[5:], cache.attention(absorbed=True), 0)  # [2, 1, D]
        q_nope, q_pe, lat_all, kpe_all = attn.project(x, cos, sin)
        ps = 4
        kv = new_kv_pages(6, ps, attn.kv_lora_rank, attn.qk_rope_head_dim)
        table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
        write_kv(kv, table, torch.arange(6).expand(2, 6), lat_all, kpe_all)
        h = q_nope.shape[2]
        w_uk, w_uv = split_kv_b(attn.kv_b_proj.weight, h, attn.qk_nope_head_dim)
        out = mla_decode_paged(absorb_query(q_nope[:, 5:], w_uk)[:, 0], q_pe[:, 5], kv, table,
                               torch.tensor([6, 6], dtype=torch.int32), attn.scale)
        got = attn.o_proj(torch.einsum("bhr,hvr->bhv", out, w_uv).reshape(2, 1, -1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_zero_length_sequence_gives_zeros_and_bad_args_raise():
    kv, table, _, _ = _paged_batch([3, 20], page_size=16)
    q, qpe = torch.randn(2, 2, R), torch.randn(2, 2, DR)
    out = mla_decode_paged(q, qpe, kv, table, torch.tensor([0, 20], dtype=torch.int32), 0.3)
    assert torch.equal(out[0], torch.zeros(2, R)) and out[1].abs().sum() > 0
    with pytest.raises(ValueError, match="exceeds block_table capacity"):
        mla_decode_paged(q, qpe, kv, table, torch.tensor([0, 100], dtype=torch.int32), 0.3)
    with pytest.raises(ValueError, match="kv_pages must be"):
        mla_decode_paged(q, qpe[..., :4], kv, table, torch.tensor([1, 1], dtype=torch.int32), 0.3)
