"""Multi-token prediction (MTP) against an independent reference, on weights named as DeepSeek's checkpoints
name them.

The reference is written here from the DeepSeek-V3 report (sec. 2.2, eq. 21-25) and the layout that the
public serving readers of the released weights use (vLLM's `deepseek_mtp.py`, SGLang's `deepseek_nextn.py`):

    h'_i^k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])      embedding half FIRST, then hidden half
    h^k    = TRM_k(h'^k)                                            a full decoder layer (MLA + MoE here)
    P^k    = shared_head.head(shared_head.norm(h^k))                predicts t_{i+k+1}
    L_MTP  = (lambda / D) * sum_k CE(P^k, t_{k+1+i})                 lambda = mtp_loss_coef (0.3)

h^0 is the main model's final-normed hidden state (what vLLM / SGLang hand their MTP module: the target
model's output after `model.norm`); h^k for k >= 1 is the previous module's block output, before its
shared_head.norm (vLLM feeds its MTP forward's output, which is pre-norm, back in). The report prints the
concatenation as [h ; Emb]; the released weights are read as [Emb ; h] by both readers, and only that order
works with them, so the reference follows the readers. vLLM also zeroes the embedding at position 0 when
drafting; that is a serving-time choice, not part of the trained module, and is left out.

The main model and the MTP module's transformer block are transformers' own DeepseekV3 modules (the
project's oracle); everything MTP-specific is plain torch below. The checkpoint is written the way DeepSeek's
are: the MTP module is `model.layers.{num_hidden_layers + k}.*` (its block's tensors under their usual
names, per-expert MoE tensors included) plus `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, and copies of
`embed_tokens` and `shared_head.head` (equal to the main model's, as in DeepSeek's release).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from hf_models import build_hf_model, random_ids
from safetensors.torch import save_file

import runtime

N_LAYERS = 3  # main model; the MTP blocks are HF layers N_LAYERS .. N_LAYERS + D - 1
MTP_COEF = 0.3  # the model's default mtp_loss_coef
TOL = dict(atol=2e-5, rtol=2e-5)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def make_checkpoint(directory, depth: int, seed: int = 7):
    """An HF DeepseekV3 with N_LAYERS + depth layers saved in DeepSeek's MTP layout (see module doc);
    returns (path, hf model, the MTP-specific tensors by checkpoint name)."""
    hf = build_hf_model("deepseek_v3", seed=seed, num_hidden_layers=N_LAYERS + depth)
    path = os.fspath(directory)
    hf.save_pretrained(path, max_shard_size="40KB")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.update(num_hidden_layers=N_LAYERS, num_nextn_predict_layers=depth)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    g = torch.Generator().manual_seed(seed + 99)
    h = hf.config.hidden_size
    extra = {}
    for k in range(depth):
        pre = f"model.layers.{N_LAYERS + k}"
        # distinct gains, so swapping enorm / hnorm or the halves of eh_proj shows
        extra[f"{pre}.enorm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=g)
        extra[f"{pre}.hnorm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=g)
        extra[f"{pre}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) / (2 * h) ** 0.5
        extra[f"{pre}.shared_head.norm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=g)
        extra[f"{pre}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
        extra[f"{pre}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    save_file(extra, os.path.join(path, "mtp.safetensors"))
    index_file = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_file))
    index["weight_map"].update({name: "mtp.safetensors" for name in extra})
    json.dump(index, open(index_file, "w"))
    return path, hf, extra


def _hf_block(hf, layer: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' decoder layer `layer` on x [B,T,H] at positions 0..T-1, causal, no cache."""
    t = x.shape[1]
    pos = torch.arange(t)[None]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    return hf.model.layers[layer](x, attention_mask=mask, position_ids=pos,
                                  position_embeddings=hf.model.rotary_emb(x, pos))


@torch.no_grad()
def reference(hf, extra: dict, ids: torch.Tensor, labels: torch.Tensor, depth: int, variant: str = "") -> dict:
    """Main logits, each depth's MTP logits, and the loss parts, from the equations in the module doc.

    `variant` names a deliberate mistake, to show the comparison can tell it apart: "report_order"
    ([h ; Emb]), "prenorm_h0" (the main hidden state before model.norm), "no_head_norm" (no
    shared_head.norm), "same_target" (MTP predicting the main model's target), "swap_norms" (enorm <-> hnorm),
    "chain_normed" (depth k+1 takes the shared_head-normed state)."""
    eps = hf.config.rms_norm_eps
    t_all = ids.shape[1]
    h = hf.model.embed_tokens(ids)
    for layer in range(N_LAYERS):
        h = _hf_block(hf, layer, h)
    h_main = hf.model.norm(h)
    logits = hf.lm_head(h_main)
    prev = h if variant == "prenorm_h0" else h_main
    mtp_logits = []
    for k in range(depth):
        pre = f"model.layers.{N_LAYERS + k}"
        t = t_all - 1 - k  # positions i with a token t_{i+k+1} (and, for the loss, a target after it)
        enorm, hnorm = extra[f"{pre}.enorm.weight"], extra[f"{pre}.hnorm.weight"]
        if variant == "swap_norms":
            enorm, hnorm = hnorm, enorm
        e = _rms(extra[f"{pre}.embed_tokens.weight"][ids[:, k + 1:]], enorm, eps)  # Emb(t_{i+k+1})
        hh = _rms(prev[:, :t], hnorm, eps)
        halves = [hh, e] if variant == "report_order" else [e, hh]
        out = _hf_block(hf, N_LAYERS + k, torch.cat(halves, -1) @ extra[f"{pre}.eh_proj.weight"].T)
        normed = out if variant == "no_head_norm" else _rms(out, extra[f"{pre}.shared_head.norm.weight"], eps)
        mtp_logits.append(normed @ extra[f"{pre}.shared_head.head.weight"].T)
        prev = normed if variant == "chain_normed" else out
    v = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    shift = 0 if variant == "same_target" else 1
    mtp_ce = [F.cross_entropy(ml.reshape(-1, v), labels[:, k + shift:k + shift + ml.shape[1]].reshape(-1),
                              ignore_index=-100) for k, ml in enumerate(mtp_logits)]
    mtp = torch.stack(mtp_ce).mean()
    return {"logits": logits, "mtp_logits": mtp_logits, "ce": ce, "mtp": mtp, "loss": ce + MTP_COEF * mtp}


@torch.no_grad()
def ours(model, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """moerun's numbers: logits, the loss through the public forward, and each depth's MTP logits."""
    loss, parts = model(ids, labels)
    h = model.hidden_states(ids)
    mtp_logits, mh = [], h
    for k in range(len(model.mtp)):
        mh = model.mtp_hidden(mh, ids[:, k:], k)
        mtp_logits.append(model.mtp_logits(mh, k))
    return {"logits": model.logits(ids), "mtp_logits": mtp_logits, "ce": parts["ce"], "mtp": parts["mtp"],
            "loss": loss}


def _data(vocab: int):
    ids = random_ids(2, 12, vocab, seed=3)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return ids, labels


def test_mtp_matches_reference_on_deepseek_named_weights(tmp_path):
    """Depth 1 (DeepSeek-V3's): the MTP weights load from `model.layers.{n}.enorm/hnorm/eh_proj/shared_head`
    and the block's usual names, and logits and loss equal the reference. Catches: the halves of the
    concatenation swapped (as the report prints them), the main hidden state taken before the final norm,
    shared_head.norm skipped, enorm / hnorm swapped, the MTP target not shifted, MTP weights not loaded or
    mapped to the wrong module (each of these is also checked to move the loss far beyond the tolerance)."""
    path, hf, extra = make_checkpoint(tmp_path / "ckpt", depth=1)
    model = runtime.load_model(path)
    assert len(model.mtp) == 1, "the MTP module did not load"
    ids, labels = _data(hf.config.vocab_size)
    ref, got = reference(hf, extra, ids, labels, 1), ours(model, ids, labels)
    torch.testing.assert_close(got["logits"], ref["logits"], **TOL)
    torch.testing.assert_close(got["mtp_logits"][0], ref["mtp_logits"][0], **TOL)
    for key in ("ce", "mtp", "loss"):
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=key)
    # the comparison tells each plausible mistake apart by far more than the tolerance
    for variant in ("report_order", "prenorm_h0", "no_head_norm", "same_target", "swap_norms"):
        wrong = reference(hf, extra, ids, labels, 1, variant)
        gap = float((wrong["mtp"] - got["mtp"]).abs())
        assert gap > 1e-2, f"the reference cannot tell '{variant}' apart (MTP loss gap {gap:.2e})"


def test_mtp_depth_two_chains_the_block_output(tmp_path):
    """Depth 2: module 2 takes module 1's transformer-block output h^1 (eq. 21 with k = 2), and predicts the
    token after next-next. (DeepSeek-V3 ships depth 1; this pins the chaining for deeper MTP.)"""
    path, hf, extra = make_checkpoint(tmp_path / "ckpt", depth=2)
    model = runtime.load_model(path)
    assert len(model.mtp) == 2
    ids, labels = _data(hf.config.vocab_size)
    ref, got = reference(hf, extra, ids, labels, 2), ours(model, ids, labels)
    torch.testing.assert_close(got["mtp_logits"][0], ref["mtp_logits"][0], **TOL)  # depth 1 as above
    torch.testing.assert_close(got["mtp_logits"][1], ref["mtp_logits"][1], **TOL)
    torch.testing.assert_close(got["loss"], ref["loss"], **TOL)
