"""The sampling distribution itself: temperature, top-k and top-p draw tokens with the right probabilities.

For each setting, N requests with the same prompt and seeds 0..N-1 each draw one token through the serving
engine (the path a `generate` request takes: SamplingParams, the request's seeded generator, the batched
step). The counts are compared by a chi-square goodness-of-fit test with the distribution written out
independently here: softmax(logits / T) over the k largest logits, then the smallest set of most likely
tokens whose mass reaches p (the one that crosses p included), renormalized (the top-k-then-top-p order of
transformers and vLLM). A draw outside that support fails at once.

False-failure rate: each setting is tested at significance ALPHA = 1e-4, so with correct sampling the whole
test fails for a fresh set of seeds with probability at most CASES x 1e-4 = 6e-4 (Bonferroni). The seeds are
fixed, so a given torch build gives the same counts every run: the test cannot flake, and a new RNG stream
fails with at most that probability. Power, with N = 2000: a temperature applied as a product instead of a
quotient, top-p that drops the crossing token, top-k off by one, a nucleus chosen on the
unscaled logits, or top-p before top-k, are each rejected (test_the_check_rejects_plausible_sampling_bugs).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import make_hf_model

import runtime
from runtime.serve import Engine, SamplingParams

N = 2000
ALPHA = 1e-4
CASES = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),  # plain softmax
    (0.5, 0, 1.0),  # sharper: temperature divides the logits
    (1.7, 0, 1.0),  # flatter
    (1.3, 5, 1.0),  # top-k alone
    (1.0, 0, 0.8),  # top-p alone
    (1.3, 12, 0.9),  # both: top-k first, then top-p on the renormalized top-k (7 tokens; 11 without top-k)
]


def expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [V] (float64) of the filtered, temperature-scaled softmax."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.numel():
        keep[:] = False
        keep[torch.argsort(z, descending=True)[:top_k]] = True
    p = torch.where(keep, torch.softmax(z.masked_fill(~keep, float("-inf")), -1), torch.zeros_like(z))
    if top_p < 1.0:
        order = torch.argsort(p, descending=True)
        before = torch.cumsum(p[order], 0) - p[order]  # mass of the more likely tokens
        nucleus = torch.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        p = torch.where(nucleus, p, torch.zeros_like(p))
    return p / p.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(p-value, degrees of freedom) of Pearson's test; cells with an expected count under 5 are pooled."""
    exp = probs * counts.sum()
    big = exp >= 5
    obs_cells = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp_cells = torch.cat([exp[big], exp[~big].sum()[None]])
    if exp_cells[-1] < 5:  # fold a small pooled cell into the smallest big one
        i = int(torch.argmin(exp_cells[:-1]))
        obs_cells[i] += obs_cells[-1]
        exp_cells[i] += exp_cells[-1]
        obs_cells, exp_cells = obs_cells[:-1], exp_cells[:-1]
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    df = obs_cells.numel() - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return p, df


def draw(engine: Engine, prompt: list[int], params: dict, n: int) -> torch.Tensor:
    """Token counts [V] of n one-token requests with seeds 0..n-1, through the engine in batches."""
    counts = torch.zeros(engine.vocab_size, dtype=torch.long)
    pending = list(range(n))
    while pending:
        batch, pending = pending[: engine.max_batch], pending[engine.max_batch:]
        for seed in batch:
            engine.add_request(f"s{seed}", prompt, SamplingParams(max_tokens=1, seed=seed, **params))
        while engine.has_work():
            for out in engine.step():
                counts[out.ids] += 1
    return counts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An HF-made DeepseekV3 (logits of order 1-10, so the distribution has a head and a tail), its
    next-token logits for one prompt, and an engine over it."""
    path, _ = make_hf_model(tmp_path_factory.mktemp("sampling"), "deepseek_v3", seed=11)
    model = runtime.load_model(path)
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        logits = model.logits(torch.tensor([prompt]))[0, -1]
    engine = Engine(model, max_batch=256, max_model_len=64, max_prefill_tokens=2048, page_size=8,
                    kv_cache_tokens=256 * 8 * 2)
    return engine, prompt, logits


@pytest.mark.timeout(120)
@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_sampling_matches_filtered_softmax(setup, temperature, top_k, top_p):
    engine, prompt, logits = setup
    probs = expected(logits, temperature, top_k, top_p)
    counts = draw(engine, prompt, dict(temperature=temperature, top_k=top_k, top_p=top_p), N)
    assert int(counts.sum()) == N
    outside = [int(t) for t in torch.nonzero((counts > 0) & (probs == 0)).flatten()]
    assert not outside, f"tokens {outside} drawn outside the filtered support"
    p, df = chi_square_p_value(counts, probs)
    support = int((probs > 0).sum())
    print(f"T={temperature} top_k={top_k} top_p={top_p}: support {support}, chi-square df {df}, p = {p:.3g}")
    assert support >= 3, "a degenerate case: the distribution must have several tokens to test"
    assert p > ALPHA, f"sampling does not follow the filtered softmax (p = {p:.3g}, df {df})"


def test_the_check_rejects_plausible_sampling_bugs(setup):
    """The same test applied to counts drawn (with torch, N samples) from what a buggy sampler would use:
    each is rejected at ALPHA. Shows the chi-square check has the power the module doc claims."""
    _, _, logits = setup
    g = torch.Generator().manual_seed(0)
    wrong = {
        "temperature multiplied": (expected(logits * 0.5, 1.0, 0, 1.0), (0.5, 0, 1.0)),
        "top-p without the crossing token": (None, (1.0, 0, 0.8)),
        "top-k off by one": (expected(logits, 1.3, 6, 1.0), (1.3, 5, 1.0)),
        "nucleus chosen before the temperature": (None, (1.3, 12, 0.9)),
        "top-p before top-k": (None, (1.3, 12, 0.9)),
    }
    # the nucleus of the unscaled logits (6 tokens here, 7 at T = 1.3), then the temperature on those
    support = expected(logits, 1.0, 12, 0.9) > 0
    scaled = torch.softmax(logits.double() / 1.3, -1) * support
    wrong["nucleus chosen before the temperature"] = (scaled / scaled.sum(), (1.3, 12, 0.9))
    # top-p over the whole vocabulary (11 tokens), then top-k (no-op here): a larger support
    wrong["top-p before top-k"] = (expected(logits, 1.3, 0, 0.9), (1.3, 12, 0.9))
    for name, (bad, case) in wrong.items():
        right = expected(logits, *case)
        if bad is None:  # nucleus that stops before the token crossing p
            order = torch.argsort(right, descending=True)
            cum = torch.cumsum(right[order], 0)
            bad = right.clone()
            bad[order[cum >= case[2]]] = 0
            bad = bad / bad.sum()
        counts = torch.bincount(torch.multinomial(bad.float(), N, replacement=True, generator=g),
                                minlength=logits.numel())
        outside = bool(((counts > 0) & (right == 0)).any())
        p, _ = chi_square_p_value(counts, right)
        assert outside or p < ALPHA, f"the check does not reject '{name}' (p = {p:.3g})"
