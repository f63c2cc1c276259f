"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv 2405.04434 section 2.1), in two equivalent forms.

Per token the cache holds only the normalized KV latent `c` [kv_lora_rank] and the shared rotary key `k_pe`
[qk_rope_head_dim] (576 values for V3). `kv_b_proj` (weight [H*(dn+dv), r]) splits per head into W_UK
[dn, r] and W_UV [dv, r]:

* expanded (training, prefill): k_nope = W_UK c, v = W_UV c per head, then ordinary causal attention.
* absorbed (decode): q_lat = W_UK^T q_nope, so q_nope.k_nope = q_lat.c; attention runs over the latent cache
  as one shared KV "head" of width r + dr, values are the first r columns, and W_UV is applied to the
  attended latent afterwards. Per step this reads the 576-wide cache instead of H*(dn+dv) expanded keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_kv_b(
    kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, dn, r] and W_UV [H, dv, r] as views of kv_b_proj.weight [H*(dn+dv), r]."""
    w = kv_b_weight.view(num_heads, -1, kv_b_weight.shape[-1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def mla_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 kv_b_weight: torch.Tensor, scale: float, q_offset: int = 0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with per-head keys/values expanded from the latent.

    q_nope [B,T,H,dn], q_pe [B,T,H,dr] (rotated), latent [B,S,r], k_pe [B,S,dr] (rotated), S = q_offset + T
    (keys before the queries come from a cache). `mask` ([B,1,T,S] or [T,S] bool, True = visible) replaces
    the causal mask, e.g. for a batch of sequences of different lengths padded to one shape. Returns [B,T,H,dv].
    """
    b, t, h, dn = q_nope.shape
    s = latent.shape[1]
    kv = F.linear(latent, kv_b_weight).view(b, s, h, -1)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, s, h, k_pe.shape[-1])], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    dv = v.shape[-1]
    fp32_cpu_inference = q.dtype == torch.float32 and q.device.type == "cpu" and not torch.is_grad_enabled()
    if dv < q.shape[-1] and (q.requires_grad or fp32_cpu_inference):
        # The fused attention kernels (flash on CPU) need one head dim for q, k and v; without it SDPA takes
        # its unfused math path. Zero columns appended to v leave the first dv output columns as they were.
        # Training pads always: the math path keeps every [T, S] score matrix for the backward (CUDA's
        # memory-efficient kernel takes dv < dq as is). fp32 inference on CPU pads for speed (the same output
        # within 1e-5); bf16 inference keeps the math path: the fused kernel rounds differently, which moves
        # a served bf16 generation across router near-ties (tests/test_bf16.py checks it against fp32).
        v = F.pad(v, (0, q.shape[-1] - dv))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif q_offset == 0 and s == t:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_mask(t, s, q_offset, q.device), scale=scale
        )
    return out[..., :dv].transpose(1, 2)


def causal_mask(t: int, s: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (position q_offset+i) may see key j <= q_offset+i."""
    qpos = torch.arange(t, device=device)[:, None] + q_offset
    return torch.arange(s, device=device)[None, :] <= qpos


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_lat[b,t,h,:] = W_UK[h]^T q_nope[b,t,h,:]: [B,T,H,dn] x [H,dn,r] -> [B,T,H,r]."""
    return torch.einsum("bthd,hdr->bthr", q_nope, w_uk)


def mla_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 kv_b_weight: torch.Tensor, scale: float, q_offset: int = 0, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Same result as `mla_expanded`, computed over the latent cache (W_UK into q, W_UV after attention).

    latent [B,S,r] and k_pe [B,S,dr] are the cache (S keys, the queries sit at q_offset..q_offset+T-1).
    `mask` ([T,S] or [B,1,T,S] bool, True = visible) overrides the causal mask, e.g. for ragged batches.
    Returns [B,T,H,dv].
    """
    h, dn = q_nope.shape[2], q_nope.shape[3]
    w_uk, w_uv = split_kv_b(kv_b_weight, h, dn)
    q_lat = absorb_query(q_nope, w_uk)
    # One shared KV head: scores over [c ; k_pe], values are c.
    scores = (
        torch.einsum("bthr,bsr->bhts", q_lat, latent) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    ) * scale
    if mask is None:
        mask = causal_mask(q_nope.shape[1], latent.shape[1], q_offset, latent.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
    o_lat = torch.einsum("bhts,bsr->bthr", probs, latent)
    return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
