"""FP8 recipe accuracy: train builtin:tiny in fp32 and with `ops.fp8_train` from the same init and data.

    .venv/bin/python bench/fp8_accuracy.py [--steps 200] [--batch 8] [--seq-len 64] [--lr 1e-3]

Prints both runs' final cross-entropy (last step, and mean of the last 10 steps) and the relative gap
|fp8 - fp32| / fp32. Data: a generated, seeded byte stream of integer sums (the same for both runs),
windows taken in order; both runs see identical batches, so the gap is paired.
tests/test_fp8_recipe.py runs a short version.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def token_stream(min_tokens: int, seed: int = 0) -> list[int]:
    """Deterministic, learnable byte tokens, independent of the repository's contents: lines of integer
    sums ("37+45=82") drawn from a seeded generator."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < min_tokens:
        a, b = rng.randrange(1000), rng.randrange(1000)
        out += f"{a}+{b}={a + b}\n".encode()
    return list(out[:min_tokens])


def train(fp8: bool, steps: int, batch: int, seq_len: int, lr: float, seed: int = 0) -> list[float]:
    """Cross-entropy per step of one run."""
    import torch

    from ops.fp8_train import convert_to_fp8_training
    from runtime import load_model

    torch.manual_seed(seed)
    model = load_model("builtin:tiny", seed=seed).train()
    if fp8:
        convert_to_fp8_training(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.tensor(token_stream(steps * batch * seq_len + 1, seed), dtype=torch.long)
    losses = []
    for s in range(steps):
        base = s * batch * seq_len
        idx = base + torch.arange(batch)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
        window = tokens[idx.clamp(max=tokens.numel() - 1)]
        loss, parts = model(window[:, :-1], labels=window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(parts["ce"].detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{'fp8' if fp8 else 'fp32'} loss is {losses[-1]} at step {s}")
    return losses


def compare(
    steps: int = 200, batch: int = 8, seq_len: int = 64, lr: float = 1e-3, seed: int = 0
) -> dict[str, float]:
    """Both runs; returns final losses and relative gaps (last step and last-10 mean)."""
    ref = train(False, steps, batch, seq_len, lr, seed)
    f8 = train(True, steps, batch, seq_len, lr, seed)
    tail = min(10, steps)
    ref_tail, f8_tail = sum(ref[-tail:]) / tail, sum(f8[-tail:]) / tail
    return {
        "steps": steps,
        "first_loss": ref[0],
        "fp32_final": ref[-1],
        "fp8_final": f8[-1],
        "gap_final": abs(f8[-1] - ref[-1]) / ref[-1],
        "fp32_tail": ref_tail,
        "fp8_tail": f8_tail,
        "gap_tail": abs(f8_tail - ref_tail) / ref_tail,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="model init and data seed")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    t0 = time.time()
    r = compare(args.steps, args.batch, args.seq_len, args.lr, args.seed)
    print(
        f"builtin:tiny, {r['steps']} steps, batch {args.batch} x seq {args.seq_len}, AdamW lr {args.lr}, "
        f"seed {args.seed}"
    )
    print(f"initial loss            {r['first_loss']:.4f}")
    print(f"fp32 final loss         {r['fp32_final']:.4f}   (mean of last 10: {r['fp32_tail']:.4f})")
    print(f"fp8 recipe final loss   {r['fp8_final']:.4f}   (mean of last 10: {r['fp8_tail']:.4f})")
    print(f"relative gap            {100 * r['gap_final']:.3f}%   (last 10: {100 * r['gap_tail']:.3f}%)")
    print(f"wall time               {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
