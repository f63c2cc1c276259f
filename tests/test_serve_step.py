"""The serving step's host side: batched sampling equals row-by-row sampling, the persistent block table,
batched prefill attention, a decode step whose torch calls do not grow with the batch, fixed-shape decode
steps (the CUDA-graph path, run here without capture), and the switches that refuse to start."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import runtime
from runtime.jobconfig import ConfigError, load_config
from runtime.serve import Engine, SamplingParams
from runtime.serve.graphs import DecodeGraphs
from runtime.serve.sampling import logprobs_of, logprobs_rows, sample, sample_rows, sample_rows_or_errors
from runtime.serve.step import StepPlan, run_plan


def _prompts(vocab: int, lens=(5, 13, 29, 8), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _engine(model, **kw) -> Engine:
    opts = dict(max_batch=16, max_model_len=256, max_prefill_tokens=2048, page_size=4, kv_cache_tokens=4096)
    opts.update(kw)
    return Engine(model, **opts)


def _generate(eng: Engine, prompts, params) -> dict[str, list]:
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    out: dict[str, list] = {str(i): [] for i in range(len(prompts))}
    lps: dict[str, list] = {str(i): [] for i in range(len(prompts))}
    while eng.has_work():
        for o in eng.step():
            out[o.key] += o.ids
            lps[o.key] += o.logprobs or []
        eng.check_invariants()
    return out, lps


MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.9),
    SamplingParams(),
    SamplingParams(temperature=0.5, top_k=1),
    SamplingParams(temperature=2.0, top_p=0.999),
]


def test_sample_rows_equals_sample_row_by_row():
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(1)) * 3
    for trial in range(5):
        gens_a = [torch.Generator().manual_seed(100 * trial + i) for i in range(len(MIXED))]
        gens_b = [torch.Generator().manual_seed(100 * trial + i) for i in range(len(MIXED))]
        one_by_one = [sample(logits[i], p, gens_a[i]) for i, p in enumerate(MIXED)]
        assert sample_rows(logits, MIXED, gens_b) == one_by_one
    greedy = [SamplingParams()] * 3
    assert sample_rows(logits[:3], greedy, [None] * 3) == logits[:3].argmax(-1).tolist()


def test_extreme_parameters_sample_and_a_failing_row_fails_alone():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4)) * 3
    best = logits.argmax(-1).tolist()
    tiny_t, tiny_p = SamplingParams(temperature=1e-39), SamplingParams(temperature=1.0, top_p=1e-46)
    # a temperature that would overflow is greedy; a nucleus that rounds to 0 keeps the best token (both paths)
    assert sample_rows(logits[:2], [tiny_t, tiny_p], [None, torch.Generator().manual_seed(0)]) == best[:2]
    assert [sample(logits[0], tiny_t, None), sample(logits[1], tiny_p, torch.Generator().manual_seed(0))] == best[:2]
    # a row whose sampling raises (its generator is not one) ends alone; the other rows get their tokens
    params = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=0.8)]
    out = sample_rows_or_errors(logits, params, [None, object(), torch.Generator().manual_seed(3)])
    assert out[0] == best[0] and isinstance(out[1], TypeError)
    assert out[2] == sample(logits[2], params[2], torch.Generator().manual_seed(3))


def test_logprobs_rows_equals_logprobs_of():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    toks, ks = [3, 7, 0, 49], [0, 1, 5, 20]
    chosen, best = logprobs_rows(logits, toks, ks)
    for i in range(4):
        lp, top = logprobs_of(logits[i], toks[i], ks[i])
        assert chosen[i] == pytest.approx(lp, abs=1e-6)
        assert [t for t, _ in best[i]] == [t for t, _ in top]
        assert [v for _, v in best[i]] == pytest.approx([v for _, v in top], abs=1e-6)


@torch.no_grad()
def test_block_table_rows_hold_each_requests_pages_written_once(tiny):
    eng = _engine(tiny, kv_cache_tokens=100, max_batch=4)  # small: preemption and row reuse happen
    plans: list[StepPlan] = []
    eng.plan_hook = plans.append
    prompts = _prompts(tiny.config.vocab_size, (9, 30, 17, 4, 22))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, ignore_eos=True))
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
        for req in eng.running:
            if req.row is not None:
                assert eng.cache.block_table.table[req.row, : len(req.pages)].tolist() == req.pages
    assert eng.metrics.counters["preemptions_total"] > 0
    written = sum(len(p) - f for plan in plans for p, f in zip(plan.pages, plan.table_from))
    total = sum(len(p) for plan in plans for p in plan.pages)
    assert written < total / 3  # each page once per admission, not once per step


@torch.no_grad()
def test_batched_prefill_attention_equals_one_segment_at_a_time(tiny):
    """Prefill chunks of different lengths and offsets in one step (padded, masked, batched) give the logits
    each chunk gets alone."""
    prompts = _prompts(tiny.config.vocab_size, (20, 7, 33, 12), seed=3)
    cached = [0, 4, 9, 0]  # tokens of each already in the cache (written by a first step)

    def fresh():
        eng = _engine(tiny, page_size=4)
        reqs = [eng.cache.alloc(-(-len(p) // 4)) for p in prompts]
        first = StepPlan()
        for i, (p, pages) in enumerate(zip(prompts, reqs)):
            if cached[i]:
                first.add(p[: cached[i]], 0, pages, 4, False, row=i)
        if len(first):
            run_plan(tiny, eng.cache, first)
        return eng, reqs

    eng, reqs = fresh()
    plan = StepPlan()
    for i, (p, pages) in enumerate(zip(prompts, reqs)):
        plan.add(p[cached[i] :], cached[i], pages, 4, True, row=i)
    together = run_plan(tiny, eng.cache, plan)
    for i, p in enumerate(prompts):
        eng1, reqs1 = fresh()
        alone = StepPlan()
        alone.add(p[cached[i] :], cached[i], reqs1[i], 4, True, row=i)
        torch.testing.assert_close(together[i], run_plan(tiny, eng1.cache, alone)[0], atol=2e-5, rtol=1e-5)


class _CountTorchCalls(TorchFunctionMode):
    """Counts torch functions and tensor methods called from Python: the host cost that grows with calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_decode_step_torch_calls_do_not_grow_with_the_batch(tiny):
    counts = {}
    for batch in (2, 12):
        eng = _engine(tiny, page_size=64)  # no request needs a new page in the measured step
        for i, p in enumerate(_prompts(tiny.config.vocab_size, [6 + i for i in range(batch)])):
            eng.add_request(str(i), p, SamplingParams(max_tokens=8, ignore_eos=True))
        eng.step()  # prefill
        eng.step()  # first decode: every row's pages already in the table
        mode = _CountTorchCalls()
        with mode:
            outs = eng.step()
        assert len(outs) == batch
        counts[batch] = mode.calls
    assert counts[2] == counts[12], counts


@torch.no_grad()
def test_fixed_shape_decode_steps_equal_eager_steps(tiny):
    """The CUDA-graph path's bucketed static step, run eagerly: same tokens and logprobs as the eager engine,
    with padding rows (batch 3 runs in bucket 4) written to the scratch page only."""
    prompts = _prompts(tiny.config.vocab_size, (5, 13, 29))
    params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3)
    ref, ref_lp = _generate(_engine(tiny), prompts, params)
    eng = _engine(tiny)
    eng.graphs = DecodeGraphs(tiny, eng.cache, eng.max_batch, eng.max_model_len, capture=False)
    got, got_lp = _generate(eng, prompts, params)
    assert got == ref
    for k in ref_lp:
        assert got_lp[k] == pytest.approx(ref_lp[k], abs=1e-5)
    assert set(eng.graphs.static) >= {4}  # three sequences ran in the bucket of four (then 2, then 1 as they end)


def test_switches_refuse_what_cannot_run(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        _engine(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="one rank"):
        _engine(tiny, speculative="mtp", group=object(), kv_cache_tokens=64)
    with pytest.raises(ValueError, match="speculative_tokens"):
        _engine(tiny, speculative="mtp", speculative_tokens=0)
    with pytest.raises(ValueError, match="not one of"):
        _engine(tiny, speculative="eagle")
    no_mtp = runtime.load_model("builtin:tiny", mtp=False)
    with pytest.raises(ValueError, match="MTP weights"):
        _engine(no_mtp, speculative="mtp")
    with pytest.raises(ConfigError, match="serve.speculative"):
        load_config(None, ["serve.speculative=eagle"])
    cfg = load_config(None, ["serve.speculative=mtp", "serve.speculative_tokens=2", "serve.cuda_graphs=false"])
    assert cfg["serve"]["speculative"] == "mtp" and cfg["serve"]["speculative_tokens"] == 2


@pytest.mark.timeout(300)
def test_moerun_serve_refuses_the_switches_at_start_up():
    """A clear message and a non-zero exit, before any rank loads a model (a multi-rank job) or serves."""
    import os
    import subprocess
    import sys

    base = [sys.executable, "-m", "launch", "serve", "--model", "builtin:tiny", "--bind", "tcp://127.0.0.1:*"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_", "RANK", "WORLD_"))}
    two = {**env, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    r = subprocess.run([*base, "--set", "serve.speculative=mtp"], env=two, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "one rank only" in r.stderr and "2 ranks" in r.stderr, r.stderr
    r = subprocess.run([*base, "--set", "serve.cuda_graphs=true"], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode != 0 and "needs a CUDA device" in r.stderr, r.stderr
