"""MTP speculative decoding (serve.speculative = "mtp"): greedy output identical to plain decoding and to HF
generate, drafts accepted on a model trained with MTP, rejection sampling that keeps the target distribution."""

from __future__ import annotations

import pytest
import torch
from hf_models import make_hf_model

import runtime
from runtime.jobconfig import load_config
from runtime.model.builtin import init_weights
from runtime.model.deepseek import DeepseekModel
from runtime.model.tokenizer import ByteTokenizer
from runtime.serve import Engine, SamplingParams
from runtime.serve.sampling import accept_greedy, accept_sampled
from runtime.serve.speculative import verify_segments

PROMPTS = ["In the morning, Ada", "The garden was quiet, so", "Hugo counted 3 boats by the", "Once, Mara and Lev",
           "Tara walked to the old"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """builtin:tiny after 80 steps on builtin:tinytext with the MTP loss (a few seconds of CPU)."""
    from runtime.train.trainer import Trainer

    out = tmp_path_factory.mktemp("mtp-train")
    cfg = load_config(None, ["train.steps=80", "train.lr=5e-3", "train.warmup_steps=5", "data.seq_len=32",
                             "train.global_batch=8", "train.mtp_loss_coef=1.0", "train.weight_decay=0.0",
                             "train.resume=false", f"train.out={out}"])
    trainer = Trainer(cfg, log=lambda m: None)
    for _ in range(80):
        trainer.train_step(trainer.batch(trainer.step))
    return trainer.model.eval()


def _run(model, prompts, params, **kw):
    opts = dict(max_batch=8, max_model_len=256, max_prefill_tokens=2048, page_size=8, kv_cache_tokens=4096)
    opts.update(kw)
    eng = Engine(model, **opts)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    ids = {str(i): [] for i in range(len(prompts))}
    lps = {str(i): [] for i in range(len(prompts))}
    while eng.has_work():
        for o in eng.step():
            ids[o.key] += o.ids
            lps[o.key] += o.logprobs or []
        eng.check_invariants()
    assert eng.cache.pages_used() == 0
    return ids, lps, eng.metrics.as_dict()


@torch.no_grad()
@pytest.mark.timeout(600)
def test_mtp_greedy_is_plain_greedy_and_drafts_are_accepted(trained):
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)
    plain, plain_lp, _ = _run(trained, prompts, params)
    # the last: chunked prefill, small pages, a small cache (drafts dropped or requests preempted for pages)
    for kw in (dict(speculative_tokens=1), dict(speculative_tokens=3),
               dict(speculative_tokens=2, max_prefill_tokens=7, page_size=4, kv_cache_tokens=160, max_batch=3)):
        got, lps, m = _run(trained, prompts, params, speculative="mtp", **kw)
        assert got == plain, kw
        for k in plain_lp:
            assert lps[k] == pytest.approx(plain_lp[k], abs=1e-4)
        assert m["spec_acceptance_rate"] > 0.2, (kw, m["spec_acceptance_rate"])  # untrained: about 0.01
        assert m["spec_tokens_per_step"] > 1.2
        assert m["spec_accepted_tokens_total"] <= m["spec_draft_tokens_total"]
        assert m["generation_tokens_total"] == 40 * len(prompts)


@torch.no_grad()
def test_mtp_stops_mid_draft_and_sampling_is_seeded(trained):
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    plain, _, _ = _run(trained, prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    stop = plain["0"][11]  # a token in the middle of request 0's output: stop there, whatever was drafted
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop_ids=[stop])
    ref, _, _ = _run(trained, prompts, params)
    got, _, _ = _run(trained, prompts, params, speculative="mtp", speculative_tokens=3)
    assert got == ref and got["0"][-1] == stop and len(got["0"]) <= 12
    sp = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, top_k=30, seed=7)
    a, _, m = _run(trained, prompts, sp, speculative="mtp", speculative_tokens=2)
    b, _, _ = _run(trained, prompts, sp, speculative="mtp", speculative_tokens=2)
    c, _, _ = _run(trained, prompts, SamplingParams(**{**sp.__dict__, "seed": 8}), speculative="mtp",
                   speculative_tokens=2)
    assert a == b and a != c and all(len(v) == 24 for v in a.values())
    assert m["spec_acceptance_rate"] > 0.1


@torch.no_grad()
@pytest.mark.timeout(300)
def test_mtp_greedy_equals_hf_generate(tmp_path):
    """On an HF checkpoint (transformers writes no MTP weights, so the MTP module here is random: almost every
    draft is rejected) speculative greedy output is still HF's token for token, logprobs within 1e-4."""
    path, hf = make_hf_model(tmp_path, "deepseek_v3", seed=11)
    loaded = runtime.load_model(path)
    model = DeepseekModel(loaded.config, mtp=True)
    init_weights(model, seed=3)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    model.eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
    got, lps, m = _run(model, prompts, SamplingParams(max_tokens=24, ignore_eos=True, logprobs=1),
                       speculative="mtp", speculative_tokens=2)
    assert m["spec_draft_tokens_total"] > 0
    hf.generation_config.eos_token_id = None
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        assert got[str(i)] == out.sequences[0, len(p):].tolist()
        ref = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores])
        chosen = ref.gather(1, out.sequences[0, len(p):, None])[:, 0]
        assert torch.allclose(torch.tensor(lps[str(i)]), chosen, atol=1e-4)


def test_rejection_sampling_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.05, 0.05, 0.3, 0.3, 0.2, 0.1]])  # a poor draft, even proposing what p never emits
    n, first, second, accepted = 20000, torch.zeros(6), torch.zeros(6), 0
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        out = accept_sampled([d], q, p, g)
        first[out[0]] += 1
        if len(out) == 2:
            accepted += 1
            second[out[1]] += 1
    assert torch.allclose(first / n, p[0], atol=0.012), first / n
    assert first[5] == 0  # p(5) = 0: never emitted, though drafted
    assert torch.allclose(second / accepted, p[1], atol=0.02)
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.012)
    assert accept_greedy([4, 5, 6], [4, 5, 9, 1]) == [4, 5, 9]
    assert accept_greedy([4, 5], [4, 5, 7]) == [4, 5, 7]
    assert accept_greedy([], [3]) == [3]


def test_a_failing_verification_ends_its_segment_alone():
    """Whatever one segment's sampling or verification raises stays with it: the others emit what they would."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1).tolist()
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8)
    segs = [(greedy, None, [best[0]], None),  # a draft the model accepts, then its own token
            (sampled, object(), None, None),  # a plain decode row whose generator is not one: raises
            (greedy, None, None, None)]
    emitted, rows, failed = verify_segments(logits, [2, 1, 1], segs)
    assert rows == [0, 2, 3] and list(failed) == [1] and isinstance(failed[1], TypeError)
    assert emitted == [[best[0], best[1]], [], [best[3]]]
    assert verify_segments(logits, [2, 1, 1], [segs[0], segs[2], segs[2]])[2] == {}

