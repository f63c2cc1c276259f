"""The serving engine without sockets: paged decode parity, chunking, preemption, prefix cache, sampling."""

from __future__ import annotations

import pytest
import torch

from runtime.serve import Engine, EngineError, PagedLatentCache, SamplingParams
from runtime.serve.cache import PageAllocator, page_hashes
from runtime.serve.step import sample


def _prompts(vocab: int, lens=(5, 13, 29, 8), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _run(model, prompts, params=None, check=True, **kw):
    opts = dict(max_batch=8, max_model_len=256, max_prefill_tokens=2048, page_size=4, kv_cache_tokens=4096)
    opts.update(kw)
    eng = Engine(model, **opts)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params or SamplingParams(max_tokens=24, ignore_eos=True))
    out = {str(i): [] for i in range(len(prompts))}
    for _ in range(5000):
        if not eng.has_work():
            break
        for o in eng.step():
            out[o.key] += o.ids
        if check:
            eng.check_invariants()
    assert not eng.has_work()
    return out, eng


def _reference(model, prompt, n):
    """Greedy decoding with the model's own contiguous LatentCache (model.decode)."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model.decode(torch.tensor([prompt]), cache)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model.decode(torch.tensor([[out[-1]]]), cache)
    return out


@torch.no_grad()
def test_paged_engine_equals_contiguous_decode(tiny):
    prompts = _prompts(tiny.config.vocab_size)
    got, eng = _run(tiny, prompts)
    for i, p in enumerate(prompts):
        assert got[str(i)] == _reference(tiny, p, 24)
    assert eng.cache.pages_used() == 0


@torch.no_grad()
@pytest.mark.parametrize("kw", [
    dict(max_prefill_tokens=7),  # chunked prefill
    dict(kv_cache_tokens=120),  # preemption by recompute
    dict(max_prefill_tokens=5, kv_cache_tokens=100, max_batch=3),  # both, and a small batch
    dict(page_size=64),
])
def test_scheduling_does_not_change_tokens(tiny, kw):
    prompts = _prompts(tiny.config.vocab_size)
    base, _ = _run(tiny, prompts)
    got, eng = _run(tiny, prompts, **kw)
    assert got == base
    if kw.get("kv_cache_tokens", 4096) < 200:
        assert eng.metrics.counters["preemptions_total"] > 0
    if kw.get("max_prefill_tokens", 2048) < 10:
        assert eng.metrics.counters["steps_total"] > 24 + 5


def test_allocator_and_prefix_cache():
    a = PageAllocator(4)
    p = a.alloc(3)
    assert p == [0, 1, 2] and a.alloc(2) is None and a.num_free == 1
    a.incref([p[0]])
    a.decref(p)
    assert a.num_free == 3 and a.refs[0] == 1
    with pytest.raises(RuntimeError):
        a.decref([1])
    cache = PagedLatentCache(2, 4, 2, 3, 1)
    pages = cache.alloc(2)
    toks = [1, 2, 3, 4, 5]
    cache.prefix.insert(page_hashes(toks, 2), pages)
    cache.allocator.decref(pages)  # the request ends; the prefix cache keeps them
    assert cache.pages_used() == 0 and len(cache.prefix) == 2
    assert cache.prefix.match(page_hashes([1, 2, 3, 4, 9], 2)) == pages
    assert cache.prefix.match(page_hashes([1, 2, 7, 4], 2)) == pages[:1]  # chained: page 2 differs
    cache.allocator.decref(pages + pages[:1])
    assert cache.alloc(4) is not None  # evicts both cached pages
    assert len(cache.prefix) == 0
    assert page_hashes([1, 2, 3], 2) != page_hashes([2, 2, 3], 2)


@torch.no_grad()
def test_prefix_cache_hit_gives_same_tokens_and_counts(tiny):
    p = _prompts(tiny.config.vocab_size, (50,))[0]
    eng = Engine(tiny, max_batch=4, max_model_len=256, page_size=8, kv_cache_tokens=512)
    outs = []
    for k in range(2):
        eng.add_request(f"r{k}", p, SamplingParams(max_tokens=5, ignore_eos=True))
        toks, fin = [], None
        while eng.has_work():
            for o in eng.step():
                toks += o.ids
                fin = o if o.finished else fin
        outs.append((toks, fin.cached_tokens))
    assert outs[0][0] == outs[1][0] == _reference(tiny, p, 5)
    assert outs[0][1] == 0 and outs[1][1] == 48
    assert eng.metrics.counters["prefix_cache_hits_tokens_total"] == 48


@torch.no_grad()
def test_sampling_seed_reproducible_and_batch_independent(tiny):
    prompts = _prompts(tiny.config.vocab_size, (6, 11))
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    a, _ = _run(tiny, prompts, sp)
    b, _ = _run(tiny, prompts[:1], sp)  # alone in the batch
    assert a["0"] == b["0"]
    c, _ = _run(tiny, prompts[:1], SamplingParams(**{**sp.__dict__, "seed": 99}))
    assert c["0"] != a["0"]


def test_sample_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.3), g) for _ in range(50)}
    assert picks == {1}
    assert sample(logits, SamplingParams(), None) == 1


@torch.no_grad()
def test_stop_ids_max_tokens_abort_priority(tiny):
    p = _prompts(tiny.config.vocab_size, (9,))[0]
    ref = _reference(tiny, p, 10)
    eng = Engine(tiny, max_batch=1, max_model_len=64, page_size=4, kv_cache_tokens=256)
    eng.add_request("stop", p, SamplingParams(max_tokens=10, stop_ids=[ref[3]], ignore_eos=True))
    eng.add_request("low", p, SamplingParams(max_tokens=3, ignore_eos=True), priority=-5)
    eng.add_request("high", p, SamplingParams(max_tokens=3, ignore_eos=True), priority=5)
    finished = []
    while eng.has_work():
        finished += [(o.key, o.finish_reason) for o in eng.step() if o.finished]
    # max_batch=1: high priority first, then arrival order, then low priority
    assert [r for r, _ in finished] == ["high", "stop", "low"]
    assert dict(finished)["stop"] == "stop" and dict(finished)["low"] == "length"
    eng.add_request("a", p, SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()
    assert eng.cache.pages_used() > 0
    out = eng.abort("a")
    assert out.finish_reason == "abort" and eng.cache.pages_used() == 0 and eng.abort("a") is None


def test_add_request_errors(tiny):
    eng = Engine(tiny, max_batch=2, max_model_len=32, page_size=4, kv_cache_tokens=16)
    with pytest.raises(EngineError) as e:
        eng.add_request("x", [1] * 30, SamplingParams(max_tokens=5))
    assert e.value.code == "too_long"
    with pytest.raises(EngineError) as e:
        eng.add_request("x", [1] * 10, SamplingParams(max_tokens=10))  # fits max_model_len, not the cache
    assert e.value.code == "too_long"
    with pytest.raises(EngineError):
        eng.add_request("x", [10**6], SamplingParams())
    with pytest.raises(EngineError):
        eng.add_request("x", [], SamplingParams())
    eng.add_request("x", [1], SamplingParams(max_tokens=2))
    with pytest.raises(EngineError):
        eng.add_request("x", [1], SamplingParams(max_tokens=2))  # id already active


def test_step_plan_split_keeps_every_token_in_order():
    from runtime.serve.step import StepPlan

    plan = StepPlan()
    for i, (n, off) in enumerate([(5, 0), (1, 9), (1, 4), (12, 0), (1, 3)]):
        plan.add(list(range(100 + i, 100 + i + n)), off, list(range(10)), 4, i % 2 == 0)
    for parts in (1, 2, 3, 5, 9):
        subs = plan.split(parts)
        full = sum(1 for s in subs if len(s))
        assert len(subs) == parts and 1 <= full <= min(parts, len(plan))
        assert all(len(s) for s in subs[:full])  # the empty ones come last
        for name in ("ids", "positions", "slots"):
            assert sum((getattr(s, name) for s in subs), []) == getattr(plan, name)
        for name in ("lens", "offsets", "pages", "want_logits"):
            assert sum((getattr(s, name) for s in subs), []) == getattr(plan, name)
        for s in subs:  # starts are re-based per micro-batch
            assert s.starts == [sum(s.lens[:i]) for i in range(len(s))]


def test_dualpipe_micro_batches_keep_each_sequence_on_its_direction():
    """Under DualPipe a stage has a copy per direction and a sequence's latents live with the direction that
    computed them: every segment goes to a micro-batch of its first page's parity, whatever the step."""
    from runtime.serve.step import StepPlan, _microbatches

    plan = StepPlan()
    for i, first in enumerate([4, 7, 2, 9, 6, 11]):
        plan.add([i] * (1 + i), 0, [first, first + 1], 8, True)
    directions = (0, 0, 1, 1)
    subs = [plan.select(g) for g in _microbatches(plan, directions)]
    assert len(subs) == 4
    for m, sub in enumerate(subs):
        assert all(pages[0] % 2 == directions[m] for pages in sub.pages), (m, sub.pages)
    assert sorted(i for sub in subs for i in sub.ids) == sorted(plan.ids)
