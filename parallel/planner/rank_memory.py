"""Peak memory of one pipeline rank under the "moerun" recipe: what moerun's trainer holds, step by step.

The "v3" recipe (DeepSeek-V3's published training setup) counts a rank's memory the way the V3 report does:
BF16 weights, FP32 gradients, FP32 master weights and BF16 moments, activations = the most in-flight
micro-batches x their mean size. The "moerun" recipe is moerun's own trainer, for `moerun dryrun` and for
jobs run with moerun:
- weights and gradients in the model's dtype (`b` bytes), the ZeRO-1 AdamW state in fp32 (master weights
  and both moments: 12 bytes per parameter, sharded over dp, experts over edp; runtime/train/optim.py);
- activations per micro-batch and stage from runtime_memory.py (nothing recomputed);
- the forward/backward peak found by walking the rank's own action list of the schedule: a forward adds its
  stage's activations, a backward (or the W of a split one) frees them, and a stage's gradients exist from
  its first backward on (the trainer drops them at every step start); the head's logits are a transient
  while the last stage runs forward or backward; every tensor the rank sends stays until the step's end
  (the lowered p2p program waits for all sends last: parallel/pipeline/lower.py);
- the optimizer step's peak: weights + gradients + state + its temporaries (per parameter bucket, in turn:
  the fp32 gradient slice and two update temporaries, 12 bytes per shard element; then the fp32 all-gather
  of the updated master weights, 8 bytes per bucket element plus the padded shard).
The larger of the two is the rank's peak. Nothing is reserved for a CUDA context or allocator slack: the
dry run counts tensors, and so does this (add --reserve-gb for a real device).
"""

from __future__ import annotations

from functools import lru_cache

from parallel.pipeline.schedule import BI, FB, SEND, B, F, W, build

OPTIMIZER_BYTES = 12  # fp32 master + fp32 exp_avg + fp32 exp_avg_sq per parameter of the shard


@lru_cache(maxsize=256)
def rank_actions(kind: str, pp: int, chunks: int, pp_rank: int) -> tuple:
    """The compute actions of `pp_rank` (F/B/I/W/FB with stage ids); one process: F then B per micro-batch."""
    if pp == 1:
        return tuple(a for m in range(chunks) for a in (_Act(F, 0, m), _Act(B, 0, m)))
    return tuple(a for a in build(kind, pp, chunks, check=False).ranks[pp_rank] if a.kind in (F, B, BI, W, FB, SEND))


class _Act:
    def __init__(self, kind: str, stage: int, mb: int) -> None:
        self.kind, self.stage, self.mb, self.b_stage = kind, stage, mb, -1


def walk_peak(actions: list, act: dict[int, float], transient: dict[int, float], grads: dict[int, float],
              sent: float = 0.0) -> dict[str, float]:
    """Largest activations + transient + gradients over the rank's actions, and its parts at that moment.
    `act`, `transient`, `grads`: bytes per stage (one micro-batch's activations; the stage's transient while
    it computes; its gradients); `sent`: bytes of one sent activation or gradient, kept to the step's end
    (counted with the activations)."""
    live = 0.0
    have: set[int] = set()
    best = {"total": 0.0, "activations": 0.0, "transient": 0.0, "gradients": 0.0}

    def at(extra_stage: int) -> None:
        g = sum(grads[s] for s in have)
        t = transient.get(extra_stage, 0.0)
        if live + t + g > best["total"]:
            best.update(total=live + t + g, activations=live, transient=t, gradients=g)

    for a in actions:
        if a.kind == SEND:
            live += sent
            continue
        if a.kind in (F, FB):
            live += act[a.stage]
            at(a.stage)
        if a.kind in (B, FB, BI):
            s = a.b_stage if a.kind == FB else a.stage
            if a.kind != BI:
                have.add(s)
            at(s)
            if a.kind != BI:
                live -= act[s]
        if a.kind == W:
            have.add(a.stage)
            at(a.stage)
            live -= act[a.stage]
    return best


def optimizer_transient(params: float, group: int) -> float:
    """Temporaries of one parameter bucket's ZeRO-1 AdamW update (bytes): the update's fp32 gradient slice,
    sqrt and denominator (12 per shard element), then the all-gather's padded shard, gathered parts and their
    concatenation (8 per bucket element + 4 per shard element; none for one rank)."""
    shard = params / group
    return 12 * shard if group == 1 else max(12 * shard, 8 * params + 4 * shard)


def rank_peak(stages: list[int], act: dict[int, float], transient: dict[int, float], dense: dict[int, float],
              expert: dict[int, float], b: int, dp: int, edp: int, actions: list, sent: float = 0.0
              ) -> dict[str, float]:
    """One pipeline rank holding `stages` (params per stage: `dense`, `expert`): its peak memory and parts."""
    pd = sum(dense[s] for s in stages)
    pe = sum(expert[s] for s in stages)
    weights = (pd + pe) * b
    optimizer = OPTIMIZER_BYTES * (pd / dp + pe / edp)
    walk = walk_peak(actions, act, transient, {s: (dense[s] + expert[s]) * b for s in stages}, sent)
    fb = weights + optimizer + walk["total"]
    opt_step = weights + (pd + pe) * b + optimizer + max(optimizer_transient(pd, dp), optimizer_transient(pe, edp))
    return {"weights": weights, "gradients": walk["gradients"], "optimizer": optimizer,
            "activations": walk["activations"], "transient": walk["transient"],
            "peak_forward_backward": fb, "peak_optimizer_step": opt_step, "peak": max(fb, opt_step)}
