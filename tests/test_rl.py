"""GRPO pieces against direct formulas, and serving vs training forward: same logprobs, same experts.

The ep=2 version of the serving-vs-training check runs inside tests/test_scheduler_dist.py (one spawn)."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.sched.rl import RLBatch, batch_loss, group_advantages, grpo_token_loss, token_logprobs


def test_group_advantages_match_direct_formula():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g)
    got = group_advantages(r, 4)
    for k in range(3):
        grp = r[4 * k : 4 * k + 4].tolist()
        mean = sum(grp) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 4)
        for j in range(4):
            assert abs(got[4 * k + j].item() - (grp[j] - mean) / (std + 1e-6)) < 1e-5
    assert torch.allclose(group_advantages(r, 4, scale=False).view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 5)


def test_grpo_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    b, t, eps, beta = 3, 7, 0.2, 0.05
    lp = torch.randn(b, t, generator=g) * 0.3 - 2
    old = lp + torch.randn(b, t, generator=g) * 0.4  # ratios well outside [0.8, 1.2] on both sides
    ref = lp + torch.randn(b, t, generator=g) * 0.1
    adv = torch.tensor([1.5, -0.7, 0.0])
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    loss, stats = grpo_token_loss(lp, old, adv, mask, eps, ref, beta)
    total, n, clipped = 0.0, 0, 0
    for i in range(b):
        for j in range(t):
            if mask[i, j] == 0:
                continue
            r = math.exp(lp[i, j] - old[i, j])
            a = adv[i].item()
            surr = min(r * a, max(1 - eps, min(1 + eps, r)) * a)
            d = (ref[i, j] - lp[i, j]).item()
            total += -surr + beta * (math.exp(d) - d - 1)
            n += 1
            clipped += abs(r - 1) > eps
    assert abs(loss.item() - total / n) < 1e-5
    assert abs(stats["clip_frac"] - clipped / n) < 1e-6 and 0 < stats["clip_frac"] < 1
    # no KL term unless asked
    loss0, stats0 = grpo_token_loss(lp, old, adv, mask, eps)
    assert "kl" not in stats0 and not torch.isclose(loss0, loss)


def test_grpo_gradient_is_the_policy_gradient_on_policy():
    """With old = current (ratio 1, unclipped), d loss / d lp = -A * mask / n_tokens."""
    lp = torch.randn(2, 5, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    loss, _ = grpo_token_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(lp.grad, -adv[:, None] * mask / mask.sum())


def test_batch_from_ragged_lists():
    b = RLBatch.from_lists([[5, 6, 7], [8, 9]], [[0, 1, 1], [1, 1]], [1.0, -1.0], [[0, -1, -2], [0, -3]], "grpo")
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1], [0, 1, 0]]  # t = 0 is never a target; padding is not
    assert b.tokens == 3
    assert b.old_logprobs[1].tolist() == [0, -3, 0]


def test_ce_loss_is_masked_cross_entropy():
    from runtime.model.loading import load_model

    model = load_model("builtin:tiny", mtp=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    b = RLBatch.from_lists(ids.tolist())
    loss, _ = batch_loss(model, b)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    ref = torch.nn.functional.cross_entropy(model.logits(ids).reshape(-1, model.config.vocab_size),
                                            labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-5


# --- serving vs training forward -------------------------------------------------------------------------
def _capture_routes(model) -> tuple[list, list]:
    from runtime.model.deepseek import Gate

    rows: list[list[torch.Tensor]] = []
    handles = []
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    for i, gate in enumerate(gates):
        rows.append([])

        def hook(mod, args, out, i=i):
            rows[i].append(out[1].detach().sort(-1).values)

        handles.append(gate.register_forward_hook(hook))
    return rows, handles


def _serve_vs_train(model, prompt: list[int], n_new: int, prefill_chunk: int) -> tuple[float, int]:
    """Greedy-serve `prompt`, then run the training forward on prompt + output; (max |dlogprob|, route
    mismatches). Serving's routes are recorded per step; the training forward's for the whole sequence."""
    from runtime.serve import Engine, SamplingParams

    eng = Engine(model, max_batch=4, max_model_len=128, max_prefill_tokens=prefill_chunk, page_size=4,
                 kv_cache_tokens=256)
    routes, hs = _capture_routes(model)
    eng.add_request("r", prompt, SamplingParams(max_tokens=n_new, logprobs=1, ignore_eos=True))
    out, lps = [], []
    while eng.has_work():
        for o in eng.step():
            out += o.ids
            lps += o.logprobs or []
    served = [torch.cat(r) for r in routes]
    for r in routes:
        r.clear()
    ids = torch.tensor([prompt + out])
    model.train()
    lp = token_logprobs(model, ids)[0, len(prompt):]
    model.eval()
    trained = [torch.cat(r) for r in routes]
    for h in hs:
        h.remove()
    n_fed = len(prompt) + n_new - 1  # the last sampled token is never fed to the model
    mism = sum(int((s[:n_fed] != t[:n_fed]).any(-1).sum()) for s, t in zip(served, trained))
    assert all(s.shape[0] == n_fed for s in served) and len(served) == model.config.num_hidden_layers - 1
    return (lp - torch.tensor(lps)).abs().max().item(), mism


def test_served_logprobs_and_experts_equal_the_training_forward():
    from runtime.model.loading import load_model

    model = load_model("builtin:tiny", mtp=False)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    err, mism = _serve_vs_train(model, prompt, 12, prefill_chunk=5)
    assert err < 1e-5 and mism == 0, (err, mism)


def test_kl_term_uses_the_frozen_reference():
    from runtime.model.loading import load_model

    model, ref = load_model("builtin:tiny", mtp=False), load_model("builtin:tiny", mtp=False, seed=1)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    b = RLBatch.from_lists(ids.tolist(), None, [1.0, -1.0], None, "grpo", kl_coef=0.1)
    loss, stats = batch_loss(model, b, ref_model=ref)
    lp = token_logprobs(model, ids)
    want, _ = grpo_token_loss(lp, lp.detach(), b.advantages, b.loss_mask, 0.2, token_logprobs(ref, ids), 0.1)
    assert abs(loss.item() - want.item()) < 1e-6 and stats["kl"] > 0
    with pytest.raises(ValueError, match="frozen reference"):
        batch_loss(model, b)
