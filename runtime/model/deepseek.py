"""The DeepSeek-V2/V3 MLA/MoE model as a plain nn.Module tree.

Parameter names equal the HF checkpoint names (`model.layers.3.self_attn.q_b_proj.weight`, ...) except two
deliberate changes that make loading a name->slice mapping: routed experts are stacked per layer
(`...mlp.experts.gate_proj` [E, I, H] holds checkpoint tensors `...mlp.experts.{e}.gate_proj.weight`), and
the MTP module (checkpoint layer index `num_hidden_layers + k`) lives at `mtp.{k}`.

The layout is given at construction: the model is built with a `parallel.expert.Dispatcher` (made from the
Mesh: one process, EP, EP under TP), so each MoE layer holds only its rank's experts and routes through that
dispatcher; `tp_plan()` says how tensor parallelism splits each linear layer (parallel.shard applies it),
and `pipeline_stage()` cuts a pipeline stage. Head counts are read from weight shapes, not the config, so a
layer with a shard of the heads just works.

There is one decoder layer, run by training, serving and the pipeline's overlap engine alike. Its forward
is written as phases (attention; gate; dispatch; experts; combine; shared experts) that the overlap engine
(parallel/pipeline/overlap.py) composes across micro-batches. Attention takes a context: none (causal over
the given tokens), a contiguous `LatentCache` (runtime/model/latent_cache.py) or the serving step's paged
cache (runtime/serve/step.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ops import IGNORE_INDEX
from ops.kernels import grouped_swiglu as selected_grouped_swiglu
from ops.mla import mla_expanded
from ops.moe import grouped_swiglu, route, sequence_balance_loss, swiglu
from ops.norm import RMSNorm
from ops.rope import apply_rope, inv_freq_and_attention_factor, rope_cos_sin, softmax_scale
from parallel.expert import Dispatcher
from parallel.pipeline.stages import PipelineStage
from parallel.shard import mark_expert_shard
from runtime.model.config import ModelConfig
from runtime.model.latent_cache import LatentCache
from runtime.model.parts import HeldParts, LayerStack, NotHeld, holds


class Rotary:
    """Cos/sin for integer positions (plain tensors, not buffers, so meta-device construction is harmless)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.inv_freq, self.attention_factor = inv_freq_and_attention_factor(
            cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings
        )
        self.interleave = cfg.rope.interleave

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_cos_sin(self.inv_freq, self.attention_factor, positions, dtype)


class MLA(nn.Module):
    """Multi-head latent attention with HF parameter names; `absorbed` picks the decode form."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, hd = cfg.num_attention_heads, cfg.qk_head_dim
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = cfg.kv_lora_rank, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, h * hd, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * hd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg.rope, cfg.qk_head_dim)
        self.interleave = cfg.rope.interleave

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> q_nope [B,T,h,dn], q_pe [B,T,h,dr], latent [B,T,r], k_pe [B,T,dr] (pe rotated)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, -1, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave)
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)
        return q_nope, q_pe, latent, k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn=None, layer_idx: int = 0
                ) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D]. `attn` is the attention context (`attend(layer_idx, mla, q_nope, q_pe,
        latent, k_pe) -> [B,T,h,dv]`: a cache writes the new latents and attends over its prefix); None:
        causal attention over these tokens alone."""
        b, t, _ = x.shape
        q_nope, q_pe, latent, k_pe = self.project(x, cos, sin)
        if attn is None:
            out = mla_expanded(q_nope, q_pe, latent, k_pe, self.kv_b_proj.weight, self.scale)
        else:
            out = attn.attend(layer_idx, self, q_nope, q_pe, latent, k_pe)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU MLP (dense layers and shared experts)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Gate(nn.Module):
    """Router: fp32 logits, then `ops.moe.route`. Keeps the last load and balance loss for the trainer."""

    def __init__(self, cfg: ModelConfig, expert_mask=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # Selection-only bias (aux-loss-free balancing); a buffer, updated by the trainer, kept in fp32.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.aux_loss_coef = 0.0
        self.expert_mask = expert_mask  # optional candidate restriction: node-limited routing under EP
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        # Keep the selection bias in fp32 through model.to(bfloat16) (as HF's _keep_in_fp32_modules does):
        # tiny bias differences flip expert choices. Device moves and to_empty still apply.
        bias = self._buffers.get("e_score_correction_bias")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("e_score_correction_bias")
        if bias is not None and new is not None and new.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.to(device=new.device, dtype=torch.float32)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,H] -> (topk_weights [B*T,k] fp32, topk_idx [B*T,k])."""
        c = self.cfg
        x2, w = x.reshape(-1, x.shape[-1]), self.weight
        logits = F.linear(x2 if x2.dtype == torch.float32 else x2.float(), w if w.dtype == torch.float32 else w.float())
        bias = self.e_score_correction_bias
        w, idx, scores = route(
            logits, top_k=c.num_experts_per_tok, scoring=c.scoring_func, topk_method=c.topk_method,
            n_group=c.n_group, topk_group=c.topk_group,
            bias=bias if bias is None or bias.dtype == torch.float32 else bias.float(),
            norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
            expert_mask=self.expert_mask)
        with torch.no_grad():  # expert loads for the balancer (scatter_add: bincount would sync on CUDA)
            flat = idx.reshape(-1)
            self.last_load = torch.zeros(c.n_routed_experts, dtype=torch.long, device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat))
        if self.training and self.aux_loss_coef > 0:
            self.last_aux_loss = self.aux_loss_coef * sequence_balance_loss(
                scores, idx, x.shape[0], c.n_routed_experts, c.num_experts_per_tok
            )
        else:
            self.last_aux_loss = None
        return w, idx


class GroupedExperts(nn.Module):
    """This rank's routed experts with stacked weights [n_local, out, in] (nn.Linear layout per expert).

    `expert_offset` is the global id of local expert 0. Forward runs the grouped GEMM over rows sorted by
    expert (`tokens_per_expert` rows each) and applies their routing weights.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, expert_offset: int = 0) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.expert_offset = expert_offset
        self.force_loop = False  # benchmarking / fallback switch

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.force_loop:
            y = grouped_swiglu(rows, self.gate_proj, self.up_proj, self.down_proj, tokens_per_expert, True)
        else:  # the Triton grouped GEMM on CUDA (inference), the torch grouped op elsewhere
            y = selected_grouped_swiglu(rows, self.gate_proj, self.up_proj, self.down_proj, tokens_per_expert)
        return y * weights[:, None].to(y.dtype)


class MoE(nn.Module):
    """Gate + this rank's routed experts + shared experts; tokens reach the experts through `dispatcher`."""

    def __init__(self, cfg: ModelConfig, dispatcher: Dispatcher) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.gate = Gate(cfg, dispatcher.expert_mask(cfg.num_experts_per_tok))
        local = dispatcher.local_experts
        self.experts = GroupedExperts(len(local), cfg.hidden_size, cfg.moe_intermediate_size, local.start)
        mark_expert_shard(self.experts, ("gate_proj", "up_proj", "down_proj"), local.start,
                          cfg.n_routed_experts // len(local))
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x)
        rows, handle = self.dispatcher.dispatch(x.reshape(-1, x.shape[-1]), idx, weights)
        out = self.dispatcher.combine(self.experts(rows, handle.tokens_per_expert, handle.recv_weights), handle)
        out = out.view_as(x)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h)), the MLP dense or MoE.

    The phases below are what the pipeline's overlap engine composes (the protocol documented in
    parallel/pipeline/overlap.py); `forward` runs them in order (MoE.forward is the MLP half)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dispatcher: Dispatcher) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (MoE(cfg, dispatcher) if cfg.is_moe_layer(layer_idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    # --- phases -------------------------------------------------------------------------------------------
    def attention_phase(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (h after the attention residual, x = post-attention-normed h, the MLP input)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, self.layer_idx)
        return h, self.post_attention_layernorm(h)

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self.mlp.dispatcher if self.is_moe else None

    def gate_phase(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routing weights [N, K], expert ids [N, K]) of the tokens x [B, T, H]."""
        return self.mlp.gate(x)

    def expert_phase(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, weights: torch.Tensor
                     ) -> torch.Tensor:
        """This rank's experts over dispatched rows grouped by expert, routing weights applied."""
        return self.mlp.experts(rows, tokens_per_expert, weights)

    def shared_phase(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts (None without): they can run while a combine is in flight."""
        return self.mlp.shared_experts(x) if self.mlp.shared_experts is not None else None

    def finish_phase(self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """h + routed experts (combined, [N, H]) + shared experts."""
        out = routed.view_as(h)
        return h + (out if shared is None else out + shared)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The gate's balance loss of the last forward (None when off)."""
        return self.mlp.gate.last_aux_loss if self.is_moe else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn=None) -> torch.Tensor:
        h, x = self.attention_phase(h, cos, sin, attn)
        return h + self.mlp(x)


class SharedHead(nn.Module):
    """The MTP module's own final norm (`shared_head.norm`); its head is the model's lm_head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction module: h' = block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])),
    logits = lm_head(shared_head.norm(h')) predict t_{i+2}. Concatenation order and the use of the main
    model's final-normed hidden state follow the vLLM/SGLang readers of the released weights; a deeper
    module takes the block output h' (before shared_head.norm), as the V3 report's chaining does."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dispatcher: Dispatcher) -> None:
        super().__init__(cfg, layer_idx, dispatcher)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def predict(
        self, h_prev: torch.Tensor, next_emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn=None
    ) -> torch.Tensor:
        """The block output h' (what the next module chains on; `shared_head.norm` then the LM head give its
        logits). `attn`: the attention context, as for a decoder layer (None: causal over these tokens;
        serving's speculative drafts pass its paged cache)."""
        h = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h_prev)], dim=-1))
        return self(h, cos, sin, attn)


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm: the held ones (`parts`; None: all), NotHeld stand-ins else."""

    def __init__(self, cfg: ModelConfig, dispatcher: Dispatcher, parts: HeldParts | None = None) -> None:
        super().__init__()
        parts = parts or HeldParts()
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size) if parts.first
                             else NotHeld("the token embedding (first pipeline stage)"))
        self.layers = LayerStack((i, DecoderLayer(cfg, i, dispatcher)) for i in range(cfg.num_hidden_layers)
                                 if parts.holds_layer(i))
        self.norm = (RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if parts.last
                     else NotHeld("the final norm (last pipeline stage)"))


class DeepseekModel(nn.Module):
    """Embedding, decoder layers, final norm, LM head, optional MTP. See module docstring for names.

    `dispatcher` (default: one process, every expert here) decides which experts this rank holds; `parts`
    (default: everything) which pipeline stages' parts it builds (runtime/model/parts.py): layers of other
    stages are absent, and the embedding / final norm / LM head / MTP of a stage held elsewhere are NotHeld
    stand-ins, so a rank materialises only what it owns."""

    def __init__(self, cfg: ModelConfig, mtp: bool = True, dispatcher: Dispatcher | None = None,
                 parts: HeldParts | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.parts = parts or HeldParts()
        if cfg.tie_word_embeddings and self.parts.layers is not None:
            raise ValueError("pipeline stages do not support tied embeddings (tie_word_embeddings=True)")
        dispatcher = dispatcher or Dispatcher(cfg.n_routed_experts)
        self.model = Backbone(cfg, dispatcher, self.parts)
        self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.parts.last
                        else NotHeld("the LM head (last pipeline stage)"))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp_depth = cfg.num_nextn_predict_layers if mtp else 0  # known on every pp rank; the last builds
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k, dispatcher)
                                 for k in range(self.mtp_depth if self.parts.last else 0))
        self.rotary = Rotary(cfg)
        self.mtp_loss_coef = 0.3

    # --- building blocks ----------------------------------------------------------------------------------
    def positions(self, t: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(offset, offset + t, device=device)

    def hidden_states(
        self, input_ids: torch.Tensor, cache: LatentCache | None = None, absorbed: bool = False
    ) -> torch.Tensor:
        """Final-normed hidden states [B,T,H]; with a cache, the tokens sit after `cache.length`."""
        h = self.model.embed_tokens(input_ids)
        offset = cache.length if cache is not None else 0
        cos, sin = self.rotary(self.positions(input_ids.shape[1], offset, input_ids.device), h.dtype)
        attn = cache.attention(absorbed) if cache is not None else None
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.model.norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    # --- how parallelism splits it ------------------------------------------------------------------------
    def tp_plan(self) -> dict[str, str]:
        """Module name -> tensor-parallel style (parallel.shard.apply_tp_plan): embeddings split the
        vocabulary; MLA splits heads (query and kv_b column-parallel, o_proj row-parallel; the latent
        down-projection stays replicated and enters the per-head region through `enter_tp`, so its norm's
        gain gets a partial gradient); dense MLPs and shared experts split the intermediate dimension; the
        LM head is column-parallel with its logits gathered (full vocabulary on every rank)."""
        plan: dict[str, str] = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Embedding):
                plan[name] = "vocab"
            elif isinstance(m, MLA):
                for proj in ("q_proj", "q_b_proj", "kv_b_proj"):
                    if hasattr(m, proj):
                        plan[f"{name}.{proj}"] = "colwise"
                plan[f"{name}.o_proj"] = "rowwise"
                plan[f"{name}.kv_a_proj_with_mqa"] = "enter_tp"
                plan[f"{name}.kv_a_layernorm"] = "partial_grad"
            elif isinstance(m, MLP):
                plan[f"{name}.gate_proj"] = plan[f"{name}.up_proj"] = "colwise"
                plan[f"{name}.down_proj"] = "rowwise"
        if isinstance(self.lm_head, nn.Linear):  # held here (a NotHeld stand-in has nothing to split)
            plan["lm_head"] = "colwise_gather"
        return plan

    def holds(self, name: str) -> bool:
        """Whether parameter `name` of the whole model is built on this rank (its pipeline stages)."""
        return holds(self.parts, name)

    def pipeline_stage(self, stage: int, num_stages: int, layers: range) -> PipelineStage:
        """Pipeline stage `stage` of `num_stages`: decoder layers `layers`, the embedding on the first stage,
        the final norm and LM head on the last, with the MTP modules when the model has them (their loss
        takes the first stage's embeddings, which the executor sends along). It references this model's
        modules (no copies). One stage (`num_stages` 1) is the whole model without its MTP modules: what
        serving runs."""
        if num_stages > 1 and self.lm_head.weight is self.model.embed_tokens.weight:
            raise ValueError("pipeline stages do not support tied embeddings (tie_word_embeddings=True)")
        first, last = stage == 0, stage == num_stages - 1
        mtp = last and num_stages > 1 and len(self.mtp) > 0

        def mtp_loss(hn: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return torch.stack(self.mtp_cross_entropy(hn, emb, labels, reduction="sum"))

        return PipelineStage(
            stage, num_stages, embed=self.model.embed_tokens if first else None,
            layers={i: self.model.layers[i] for i in layers}, norm=self.model.norm if last else None,
            head=self.lm_head if last else None, rotary=self.rotary, mtp=self.mtp if mtp else None,
            mtp_loss=mtp_loss if mtp else None,
            names={"embed": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm", "head": "lm_head",
                   "mtp": "mtp"})

    # --- public API ---------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor [B,T] -> float32 logits [B,T,V] over the full vocabulary (the Python API contract)."""
        _check_ids(input_ids, self.config.vocab_size)
        return self.head(self.hidden_states(input_ids)).float()

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        p = self.lm_head.weight
        c = self.config
        return LatentCache(
            len(self.model.layers), batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, p.dtype, p.device
        )

    def decode(self, input_ids: torch.Tensor, cache: LatentCache, absorbed: bool = True) -> torch.Tensor:
        """Append `input_ids` [B,T] (a prefill chunk or one decode token) to `cache`; logits [B,T,V] fp32."""
        _check_ids(input_ids, self.config.vocab_size)
        return self.head(self.hidden_states(input_ids, cache, absorbed)).float()

    def mtp_hidden(self, h: torch.Tensor, input_ids: torch.Tensor, k: int = 0) -> torch.Tensor:
        """MTP module k's block output on hidden states h [B,T,H] (the main model's final-normed ones for
        k = 0, module k-1's block output after) and the next tokens: [B,T-1,H]."""
        t = input_ids.shape[1] - 1
        next_emb = self.model.embed_tokens(input_ids[:, 1:])
        cos, sin = self.rotary(self.positions(t, 0, input_ids.device), h.dtype)
        return self.mtp[k].predict(h[:, :t], next_emb, cos, sin)

    def mtp_logits(self, mh: torch.Tensor, k: int = 0) -> torch.Tensor:
        """fp32 logits of MTP module k from its block output."""
        return self.head(self.mtp[k].shared_head.norm(mh)).float()

    def mtp_cross_entropy(self, h: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
                          ) -> list[torch.Tensor]:
        """Per MTP module k, the cross-entropy of its predictions of labels[t+k+1] at position t (the
        `reduction` of F.cross_entropy, IGNORE_INDEX ignored). h: final-normed main hidden states [B,T,H];
        emb: the embeddings of the same tokens [B,T,H] (module k takes those of tokens t+k+1). A pipeline's
        last stage calls this with the first stage's embeddings (parallel/pipeline/overlap.py)."""
        out, mh, n = [], h, h.shape[1]
        for k in range(min(len(self.mtp), n - 1)):
            t = n - 1 - k  # module k sees tokens shifted by k+1; deeper ones chain on the previous output
            cos, sin = self.rotary(self.positions(t, 0, h.device), h.dtype)
            mh = self.mtp[k].predict(mh[:, :t], emb[:, k + 1 : k + 1 + t], cos, sin)
            ml = self.mtp_logits(mh, k)
            out.append(F.cross_entropy(ml.reshape(-1, ml.shape[-1]), labels[:, k + 1 : k + 1 + t].reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction=reduction))
        return out

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Without labels: logits [B,T,V]. With labels [B,T] (labels[t] = token after input t; -100 ignored):
        (loss, parts) where parts["ce"] is the mean token cross-entropy, parts["mtp"] the MTP cross-entropy
        (predicting labels[t+1] at position t) when MTP modules exist, parts["aux"] the balance loss when
        gates have aux_loss_coef > 0; loss = ce + mtp_loss_coef * mtp + aux. The ids' range is checked
        where they enter (the trainer, `logits`, `decode`): reading them here would sync every step."""
        _check_ids(input_ids, self.config.vocab_size, values=False)
        h = self.hidden_states(input_ids)
        logits = self.head(h)
        if labels is None:
            return logits
        v = logits.shape[-1]
        ce = F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        parts: dict[str, torch.Tensor] = {"ce": ce}
        loss = ce
        if len(self.mtp) and input_ids.shape[1] > 1:
            mtp_losses = self.mtp_cross_entropy(h, self.model.embed_tokens(input_ids), labels)
            parts["mtp"] = torch.stack(mtp_losses).mean()
            loss = loss + self.mtp_loss_coef * parts["mtp"]
        aux = [m.gate.last_aux_loss for m in self.modules() if isinstance(m, MoE) and m.gate.last_aux_loss is not None]
        if aux:
            parts["aux"] = torch.stack(aux).sum()
            loss = loss + parts["aux"]
        return loss, parts


def _check_ids(input_ids: torch.Tensor, vocab: int, values: bool = True) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if values and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"input_ids out of range [0, {vocab}): min {int(input_ids.min())}, max {int(input_ids.max())}")
