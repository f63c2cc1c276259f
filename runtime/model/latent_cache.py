"""A contiguous MLA latent cache for `DeepseekModel.decode` (batched generation without the serving engine).

Per layer it holds the normalised latent [B, S_max, kv_lora_rank] and the rotated shared rope key
[B, S_max, dr]; all rows share one `length`. `attention(absorbed)` is the attention context the decoder
layers take: it appends each layer's new latents and attends over the filled prefix, in the absorbed
(decode) or expanded form. The serving engine's paged cache (runtime/serve/cache.py) uses the same
per-layer row layout.
"""

from __future__ import annotations

import torch

from ops.mla import mla_absorbed, mla_expanded

__all__ = ["LatentCache"]


class LatentCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.latent = torch.zeros(num_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new positions for `layer` at [length, length+T); return the layer's filled prefix."""
        t = latent.shape[1]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"latent cache full: {self.length} + {t} tokens > max_len {self.max_len}")
        self.latent[layer, :, self.length : end] = latent
        self.k_pe[layer, :, self.length : end] = k_pe
        return self.latent[layer, :, :end], self.k_pe[layer, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def attention(self, absorbed: bool = False) -> _CachedAttention:
        """The attention context of one forward that appends to this cache (then call `advance`)."""
        return _CachedAttention(self, absorbed)


class _CachedAttention:
    def __init__(self, cache: LatentCache, absorbed: bool) -> None:
        self.cache, self.absorbed = cache, absorbed

    def attend(self, layer_idx: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        offset = self.cache.length
        latent, k_pe = self.cache.append(layer_idx, latent, k_pe)
        fn = mla_absorbed if self.absorbed else mla_expanded
        return fn(q_nope, q_pe, latent, k_pe, attn.kv_b_proj.weight, attn.scale, q_offset=offset)
