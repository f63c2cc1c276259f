"""MTP speculative decoding: DeepSeek-V3's multi-token-prediction module drafts, the model verifies.

A decoding request with drafts d_1..d_m (m <= serve.speculative_tokens) after its last token x at position n
puts x, d_1..d_m at positions n..n+m into the step, as decode rows: each attends over the cache up to its own
position, exactly as a plain decode token would, and each gets logits. Verification (`sampling.accept_greedy`
or `sampling.accept_sampled`) keeps a prefix of the drafts and adds one token of the model's own, so a step
emits 1..m+1 tokens per request: greedy output is the model's argmax at every position (identical to plain
decoding), sampled output is distributed as plain sampling (standard rejection sampling).

Then the MTP module runs once over every position the step computed. Its input at position i is the model's
final-normed hidden state h_i and the token at i+1 (now known: the prompt, the accepted drafts, the new
token); it writes its own latent cache (a page-pool slot of its own, same pages and positions as the model's)
and, at each request's last accepted position, gives the first draft of the next step. Drafts 2..m chain the
module on its own output at the next positions (EAGLE-style; those cache rows are rewritten once the model
has verified the position). Positions the model rejected hold stale rows in both caches; every later read
stops before them until a later step rewrites them.

This runs on one rank (the MTP step is a second forward whose inputs depend on the sampled tokens; the
multi-rank plan broadcast carries one forward per step): `Engine` refuses it under a multi-rank layout.
"""

from __future__ import annotations

import torch

from runtime.serve.attention import PagedAttention, StepIndex
from runtime.serve.sampling import SamplingParams, accept_greedy, accept_sampled, processed_probs, sample_rows
from runtime.serve.step import StepPlan, decoder_forward

__all__ = ["MTPSpeculator", "pick_drafts", "verify_segments"]


class MTPSpeculator:
    """The model's forward with hidden states kept, and the MTP module's drafting, over one page pool whose
    last layer slot belongs to the MTP module (`num_layers` decoder layers come first)."""

    def __init__(self, model, cache, num_layers: int, tokens: int) -> None:
        if not len(model.mtp):
            raise ValueError("serve.speculative = 'mtp' needs a checkpoint with MTP weights "
                             "(num_nextn_predict_layers >= 1 and its layer in the checkpoint); this model has none")
        self.model, self.cache, self.tokens = model, cache, tokens
        self.mtp = model.mtp[0]
        self.layer_ids = list(range(num_layers))
        self.slots = {li: i for i, li in enumerate(self.layer_ids)}
        self.slots[self.mtp.layer_idx] = num_layers
        self.device = model.lm_head.weight.device

    @torch.no_grad()
    def verify(self, plan: StepPlan) -> tuple[StepIndex, PagedAttention, torch.Tensor, torch.Tensor]:
        """The model's forward over the plan: (index, attention context, final-normed hidden states [N, H],
        fp32 logits of the wanted rows [W, V])."""
        m = self.model
        index = StepIndex(plan, self.cache, self.device)
        ctx = PagedAttention(self.cache, index, self.slots)
        hidden = m.model.norm(decoder_forward(m, index, ctx, self.layer_ids)[0])
        logits = m.head(hidden.index_select(0, index.want_rows)).float()
        return index, ctx, hidden, logits

    @torch.no_grad()
    def draft(self, index: StepIndex, ctx: PagedAttention, hidden: torch.Tensor, next_ids: list[int],
              rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over every position of the step (hidden [N, H] and the token after each position,
        next_ids [N]); returns its output after `shared_head.norm` and fp32 logits at `rows` ([R, H], [R, V]).
        A further draft chains the module on that normed output: the kind of input (a final-normed hidden
        state) it was trained on."""
        m = self.model
        emb = m.model.embed_tokens(torch.tensor(next_ids, dtype=torch.long, device=self.device))
        cos, sin = index.rope(m, emb.dtype)
        out = self.mtp.predict(hidden[None], emb[None], cos, sin, ctx)[0]
        sel = self.mtp.shared_head.norm(out.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device)))
        return sel, m.head(sel).float()

    @torch.no_grad()
    def chain(self, plan: StepPlan, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One more draft per segment: `plan` holds one token per request (the previous draft, at the position
        after the previous pass's), `hidden` [R, H] the previous pass's outputs; returns ([R, H], [R, V])."""
        index = StepIndex(plan, self.cache, self.device)
        ctx = PagedAttention(self.cache, index, self.slots)
        return self.draft(index, ctx, hidden, plan.ids, list(range(len(plan.ids))))


def verify_segments(logits: torch.Tensor, want: list[int], segs: list[tuple]
                    ) -> tuple[list[list[int]], list[int], dict[int, Exception]]:
    """The tokens each segment of a step emits, the first logits row of each segment, and the segments whose
    own sampling or verification raised ({segment: exception}; they emit nothing and end alone).

    `want[k]` logits rows belong to segment k; `segs[k]` = (params, generator, drafts or None, draft_probs).
    A segment without drafts emits one token (sampled as plain decoding would) when it has a logits row, none
    otherwise (a prefill chunk before the end of its prompt); one with drafts emits what verification keeps.
    The step is verified at once; when that raises, segment by segment, to find whose it is."""
    try:
        emitted, rows = _verify_all(logits, want, segs)
        return emitted, rows, {}
    except Exception:  # noqa: BLE001 - find the segment(s) it belongs to, below
        pass
    rows = [sum(int(w) for w in want[:k]) for k in range(len(segs))]
    emitted, failed = [], {}
    for k, seg in enumerate(segs):
        try:
            emitted.append(_verify_all(logits[rows[k] : rows[k] + int(want[k])], [want[k]], [seg])[0][0])
        except Exception as e:  # noqa: BLE001 - stays with this segment's request
            emitted.append([])
            failed[k] = e
    return emitted, rows, failed


def _verify_all(logits: torch.Tensor, want: list[int], segs: list[tuple]) -> tuple[list[list[int]], list[int]]:
    emitted: list[list[int]] = [[] for _ in segs]
    rows, single, greedy_verify, row = [], [], False, 0
    for k, (params, _, drafts, _) in enumerate(segs):
        rows.append(row)
        if drafts:
            greedy_verify |= params.greedy
        elif want[k]:
            single.append(k)
        row += int(want[k])
    if single:
        sel = logits.index_select(0, torch.tensor([rows[k] for k in single], device=logits.device))
        for k, t in zip(single, sample_rows(sel, [segs[k][0] for k in single], [segs[k][1] for k in single])):
            emitted[k] = [t]
    argmax = logits.argmax(dim=-1).tolist() if greedy_verify else []
    for k, (params, gen, drafts, draft_probs) in enumerate(segs):
        if not drafts:
            continue
        n = len(drafts) + 1
        if params.greedy:
            emitted[k] = accept_greedy(drafts, argmax[rows[k] : rows[k] + n])
        else:
            target = processed_probs(logits[rows[k] : rows[k] + n], [params] * n)
            emitted[k] = accept_sampled(drafts, draft_probs[: len(drafts)], target, gen)
    return emitted, rows


def pick_drafts(logits: torch.Tensor, params: list[SamplingParams], generators: list
                ) -> list[tuple[int, torch.Tensor | None]]:
    """One draft per MTP logits row: the argmax for a greedy request; for a sampled one a sample from the
    draft distribution (processed like the request's own sampling: temperature, top-k, top-p), returned too
    for the rejection test."""
    greedy = logits.argmax(dim=-1).tolist() if any(p.greedy for p in params) else []
    out: list[tuple[int, torch.Tensor | None]] = []
    for j, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            out.append((greedy[j], None))
        else:
            q = processed_probs(logits[j : j + 1], [p])[0]
            out.append((int(torch.multinomial(q, 1, generator=g)), q))
    return out
