"""MTP speculative decoding against plain decoding, same engine, same model, same prompts, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speculative.py [--train-steps 400] [--tokens 1] [--batch 1]
    OMP_NUM_THREADS=1 .venv/bin/python bench/speculative.py --layers 8    # builtin:tiny's shape, 8 layers

Trains builtin:tiny with its MTP module on builtin:tinytext (the project's Trainer, `train.mtp_loss_coef`;
the weights are kept in --cache and reused when the same training was done before); `--layers N` trains
builtin:tiny's shape with N decoder layers instead of 4 (the MTP module's share of a step's work is about
one layer in N + 1: DeepSeek-V3 has 61). Then it generates greedily
for held-out prompts (sentences of the same grammar from another seed) with `serve.speculative = "off"` and
`"mtp"`, alternating the two per round so that a change of machine load hits both alike. Prints, for each:
tokens/s, and for MTP the acceptance rate (accepted drafts / drafts), tokens per decode step of a request,
and the speed-up (each round's plain over MTP time, the median of the rounds); checks that the greedy
outputs are identical token for token. `--sampled` also runs temperature 0.8 (no identity check there:
rejection sampling keeps the distribution, not the draws).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=400, help="training steps of builtin:tiny (default 400)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4: builtin:tiny itself)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1, help="drafts per step, serve.speculative_tokens (default 1)")
    p.add_argument("--batch", type=int, default=1, help="concurrent requests (default 1)")
    p.add_argument("--prompts", type=int, default=8, help="prompts (default 8)")
    p.add_argument("--new", type=int, default=64, help="generated tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each (default 3)")
    p.add_argument("--sampled", action="store_true", help="also compare at temperature 0.8")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--cache", default=os.path.join(ROOT, ".bench-cache"),
                   help="directory for the trained weights (default .bench-cache/ in the checkout)")
    return p.parse_args(argv)


def trained_model(a: argparse.Namespace):
    """builtin:tiny after `a.train_steps` steps with the MTP loss (cached by the training settings)."""
    from runtime.jobconfig import load_config
    from runtime.train.trainer import Trainer

    sets = [f"train.steps={a.train_steps}", f"train.lr={a.lr}", "train.warmup_steps=10",
            f"data.seq_len={a.seq_len}", "train.global_batch=8", "train.mtp_loss_coef=1.0",
            "train.weight_decay=0.0", "train.resume=false", f"train.out={os.path.join(a.cache, 'run')}"]
    if a.layers != 4:
        sets.append(f"model.path={initial_checkpoint(a)}")
    key = hashlib.sha256(" ".join(sets).encode()).hexdigest()[:16]
    path = os.path.join(a.cache, f"tiny-mtp-{key}.pt")
    trainer = Trainer(load_config(None, sets), log=lambda m: None)
    if os.path.exists(path):
        trainer.model.load_state_dict(torch.load(path, weights_only=True))
        print(f"trained weights: {path} (cached)")
    else:
        t0 = time.perf_counter()
        for _ in range(a.train_steps):
            m = trainer.train_step(trainer.batch(trainer.step))
            if trainer.step % 50 == 0 or trainer.step == a.train_steps:
                print(f"  train step {trainer.step}/{a.train_steps}: loss {m['loss']:.3f}  "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        os.makedirs(a.cache, exist_ok=True)
        torch.save(trainer.model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"trained weights: {path}")
    return trainer.model.eval()


def initial_checkpoint(a: argparse.Namespace) -> str:
    """An HF-format directory: builtin:tiny's config with `a.layers` decoder layers, its deterministic init."""
    import dataclasses

    from runtime.model.builtin import init_weights
    from runtime.model.config import builtin_tiny_config
    from runtime.model.deepseek import DeepseekModel
    from runtime.model.hf_checkpoint import save_hf_checkpoint

    path = os.path.join(a.cache, f"tiny-{a.layers}-layers")
    if not os.path.exists(os.path.join(path, "config.json")):
        model = DeepseekModel(dataclasses.replace(builtin_tiny_config(), num_hidden_layers=a.layers), mtp=True)
        init_weights(model, seed=0)
        save_hf_checkpoint(model, path)
    return path


def prompts(n: int) -> list[list[int]]:
    """Held-out prompts: the start of n sentences of builtin:tinytext's grammar drawn with another seed."""
    from runtime.model.tokenizer import ByteTokenizer
    from runtime.train.corpus import tinytext

    text = tinytext(8192, seed=99)
    starts = [i + 1 for i, c in enumerate(text[:-40]) if c == " " and text[i - 1] == "."][:n]
    tok = ByteTokenizer()
    return [tok.encode(text[s : s + 24]) for s in starts]


def generate(model, ps: list[list[int]], a: argparse.Namespace, speculative: str, temperature: float
             ) -> tuple[dict[str, list[int]], tuple[float, float], dict]:
    """Every prompt, `a.batch` at a time; (outputs by index, (wall, CPU) seconds, engine metrics)."""
    from runtime.serve import Engine, SamplingParams

    eng = Engine(model, max_batch=max(1, a.batch), max_model_len=256, page_size=16, kv_cache_tokens=8192,
                 speculative=speculative, speculative_tokens=a.tokens)
    out: dict[str, list[int]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(0, len(ps), a.batch):
        for i in range(b, min(b + a.batch, len(ps))):
            eng.add_request(str(i), ps[i], SamplingParams(max_tokens=a.new, ignore_eos=True, temperature=temperature,
                                                          seed=i))
        while eng.has_work():
            for o in eng.step():
                out.setdefault(o.key, []).extend(o.ids)
    return out, (time.perf_counter() - t0, time.process_time() - c0), eng.metrics.as_dict()


def main() -> int:
    a = parse()
    torch.set_num_threads(a.threads)
    model = trained_model(a)
    ps = prompts(a.prompts)
    total = len(ps) * a.new
    print(f"model: builtin:tiny ({a.layers} layers) trained {a.train_steps} steps with MTP; {len(ps)} prompts of "
          f"{len(ps[0])} bytes, "
          f"{a.new} new tokens each, batch {a.batch}, {a.tokens} draft(s) per step, torch threads {a.threads}")
    temps = [0.0, 0.8] if a.sampled else [0.0]
    for temp in temps:
        generate(model, ps[:1], a, "mtp", temp)  # warm-up
        plain, spec, same, m = [], [], True, {}
        for r in range(a.rounds):
            order = ("off", "mtp") if r % 2 == 0 else ("mtp", "off")
            got = {}
            for mode in order:
                got[mode] = generate(model, ps, a, mode, temp)
            (pw, pc), (sw, sc) = got["off"][1], got["mtp"][1]
            plain.append((pw, pc))
            spec.append((sw, sc))
            m = got["mtp"][2]
            same &= got["off"][0] == got["mtp"][0]
            print(f"  round {r + 1}: plain {total / pw:7.1f} tok/s   mtp {total / sw:7.1f} tok/s   speed-up "
                  f"{pw / sw:.2f}x (CPU time: {pc / sc:.2f}x)   load average {os.getloadavg()[0]:.2f}")
        kind = "greedy" if temp == 0.0 else f"temperature {temp}"
        pw, sw = min(x[0] for x in plain), min(x[0] for x in spec)
        up = statistics.median(p[0] / q[0] for p, q in zip(plain, spec))  # each round's pair ran back to back
        up_cpu = statistics.median(p[1] / q[1] for p, q in zip(plain, spec))
        print(f"{kind}: plain {total / pw:.1f} tok/s, mtp {total / sw:.1f} tok/s (best of {a.rounds}); speed-up "
              f"{up:.2f}x (median of the rounds; CPU time {up_cpu:.2f}x); acceptance rate "
              f"{m['spec_acceptance_rate']:.3f}, tokens per step {m['spec_tokens_per_step']:.2f}"
              + (f"; outputs identical: {'yes' if same else 'NO'}" if temp == 0.0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
