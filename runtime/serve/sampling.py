"""Sampling and log-probabilities of a serving step, batched over the step's rows on the logits' device.

`sample` (one row) is the definition; `sample_rows` gives the same token for every row with a constant number
of operators for the whole batch (greedy rows: one argmax; sampled rows: temperature, top-k and top-p applied
to all of them at once) plus one `torch.multinomial` per sampled row, drawn from that request's own
generator, so a seed reproduces its samples whatever else is in the batch. Only token ids (and the requested
log-probabilities) travel to the host, never the full logits.

Speculative decoding's verification (`accept_greedy`, `accept_sampled`) is here too: greedy drafts are
accepted while they equal the target's argmax; sampled drafts by standard rejection sampling (accept d with
probability min(1, p(d)/q(d)), else sample from max(0, p - q) normalised; all accepted: one more token from
p), which keeps the output distributed exactly as plain sampling from p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GREEDY_BELOW", "MAX_LOGPROBS", "SamplingParams", "accept_greedy", "accept_sampled", "emitted_logprobs",
           "logprobs_of", "logprobs_rows", "make_generator", "processed_probs", "sample", "sample_rows",
           "sample_rows_or_errors"]

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (dividing by it overflows float32 logits)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    logprobs: int = 0  # 0: none; k in 1..20: chosen token's logprob + the k best
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


# --- one row: the definition ------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a logits row [V] (fp32). A temperature below `GREEDY_BELOW` is greedy, and the most
    likely token always stays in the top-p nucleus, so any valid parameters give a computable distribution."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False  # even when top_p rounds to 0 in float32
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[list[float]]]:
    """(log p(token), [[id, logprob] x k best]) under log_softmax of the raw logits (before temperature)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k > 0 else None
    best = [] if top is None else [[int(i), float(v)] for v, i in zip(top.values, top.indices)]
    return float(lp[token]), best


# --- many rows at once ------------------------------------------------------------------------------------------
def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution `sample` draws from, for each row of logits [n, V] (no greedy rows): temperature, then
    top-k, then top-p, then softmax, row i with params[i]. The same arithmetic as `sample`, row by row."""
    dev = logits.device
    scores = logits.float() / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    vocab = scores.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        kmax = max(ks)
        top = torch.topk(scores, kmax).values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        kth = kth.masked_fill(torch.tensor([k == 0 for k in ks], device=dev)[:, None], float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
        drop[:, 0] = False  # the most likely token stays, even when top_p rounds to 0 in float32
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)
    return torch.softmax(scores, dim=-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of logits [n, V], as `sample(logits[i], params[i], generators[i])` would give."""
    n = logits.shape[0]
    if n == 0:
        return []
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == n:
        return logits.argmax(dim=-1).tolist()
    out = [0] * n
    if greedy:
        sel = torch.tensor(greedy, device=logits.device)
        for i, t in zip(greedy, logits.index_select(0, sel).argmax(dim=-1).tolist()):
            out[i] = t
    rest = [i for i in range(n) if not params[i].greedy]
    probs = processed_probs(logits.index_select(0, torch.tensor(rest, device=logits.device)),
                            [params[i] for i in rest])
    picks = [torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(rest)]
    for i, t in zip(rest, torch.cat(picks).tolist()):
        out[i] = t
    return out


def sample_rows_or_errors(logits: torch.Tensor, params: list[SamplingParams], generators: list
                          ) -> list[int | Exception]:
    """`sample_rows`; when that raises, `sample` row by row, so that whatever one request's sampling raises
    stays with that request (its entry is the exception) and the other rows still get their tokens. Rows the
    batched pass drew before the failure draw again: their generators move on twice, in that step only."""
    try:
        return sample_rows(logits, params, generators)
    except Exception:  # noqa: BLE001 - find the row(s) it belongs to, below
        pass
    out: list[int | Exception] = []
    for j, (p, g) in enumerate(zip(params, generators)):
        try:
            out.append(sample(logits[j], p, g))
        except Exception as e:  # noqa: BLE001 - stays with this row's request
            out.append(e)
    return out


def logprobs_rows(logits: torch.Tensor, tokens: list[int], ks: list[int]
                  ) -> tuple[list[float], list[list[list[float]]]]:
    """`logprobs_of` for each row of logits [n, V]: (chosen token's logprob, its ks[i] best) per row."""
    dev = logits.device
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=dev)[:, None])[:, 0].tolist()
    kmax = max(ks, default=0)
    if kmax == 0:
        return chosen, [[] for _ in tokens]
    top = torch.topk(lp, kmax)
    vals, ids = top.values.tolist(), top.indices.tolist()
    best = [[[i, v] for i, v in zip(ids[r][:k], vals[r][:k])] for r, k in enumerate(ks)]
    return chosen, best


def emitted_logprobs(logits: torch.Tensor, ks: list[int], emitted: list[list[int]], rows: list[int]) -> list:
    """For each request i asking for logprobs (ks[i] > 0): ([logprob], [top ks[i]]) of its emitted tokens,
    token j scored on logits row rows[i] + j; None for the others. One batched computation."""
    out: list = [None] * len(ks)
    at, toks, kk, owner = [], [], [], []
    for i, k in enumerate(ks):
        if k and emitted[i]:
            out[i] = ([], [])
            for j, t in enumerate(emitted[i]):
                at.append(rows[i] + j)
                toks.append(t)
                kk.append(k)
                owner.append(i)
    if at:
        sel = logits if at == list(range(logits.shape[0])) else logits.index_select(
            0, torch.tensor(at, device=logits.device))
        chosen, best = logprobs_rows(sel, toks, kk)
        for i, c, b in zip(owner, chosen, best):
            out[i][0].append(c)
            out[i][1].append(b)
    return out


# --- speculative verification -----------------------------------------------------------------------------------
def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """Tokens emitted for one request: the drafts while each equals the target's argmax at its position,
    then the target's own token there (targets has len(drafts) + 1 entries)."""
    out = []
    for d, t in zip(drafts, targets):
        if d != t:
            break
        out.append(d)
    out.append(targets[len(out)])
    return out


def accept_sampled(drafts: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> list[int]:
    """Standard speculative rejection sampling for one request: drafts d_j drawn from draft_probs[j] (q),
    target_probs [len(drafts) + 1, V] (p). Accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the
    first rejection emit a token from max(0, p_j - q_j) normalised; all accepted: one more from p_k."""
    m = len(drafts)
    dev = target_probs.device
    if m:
        idx = torch.tensor(drafts, device=dev)[:, None]
        p = target_probs[:m].gather(1, idx)[:, 0]
        q = draft_probs.gather(1, idx)[:, 0]
        u = torch.rand(m, generator=generator, device=dev)
        ok = (u * q < p).tolist()  # u < p/q without dividing by a zero q
    else:
        ok = []
    out = []
    for j in range(m):
        if not ok[j]:
            resid = (target_probs[j] - draft_probs[j]).clamp_min(0)
            total = resid.sum()
            dist = resid / total if float(total) > 0 else target_probs[j]
            out.append(int(torch.multinomial(dist, 1, generator=generator)))
            return out
        out.append(drafts[j])
    out.append(int(torch.multinomial(target_probs[m], 1, generator=generator)))
    return out
