"""Forward and forward+backward tokens/s of moerun's model vs transformers' DeepseekV3ForCausalLM.

Same random weights (an HF model saved and loaded by moerun), same inputs, same process, timed alternately:

    OMP_NUM_THREADS=2 .venv/bin/python bench/model_forward.py --hidden 256 --layers 4 --experts 32 --topk 4 \
        --batch 4 --seq 256

Prints both throughputs and the ratio (moerun / HF); `--expert-loop` also times moerun with the per-expert
segment loop instead of the grouped GEMM.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--expert-loop", action="store_true", help="also time moerun with the per-expert loop")
    p.add_argument("--moe-only", action="store_true", help="time only the MoE layer, not the whole model")
    p.add_argument(
        "--hf-experts",
        default=None,
        help="transformers experts implementation (default: its own "
        "choice, grouped_mm in 5.23; 'eager' is its per-expert loop)",
    )
    args = p.parse_args(argv)

    import torch

    import runtime
    from runtime.model.deepseek import GroupedExperts

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hf_models import build_hf_model

    dtype = getattr(torch, args.dtype)
    h = args.hidden
    hf = build_hf_model(
        "deepseek_v3",
        seed=0,
        vocab_size=args.vocab,
        hidden_size=h,
        intermediate_size=4 * h,
        moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.topk,
        n_group=4,
        topk_group=2,
        q_lora_rank=h // 2,
        kv_lora_rank=h // 4,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=max(4096, args.seq),
    )
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = runtime.load_model(d, dtype=dtype, device=args.device)
    hf = hf.to(device=args.device, dtype=dtype)
    if args.hf_experts:
        hf.set_experts_implementation(args.hf_experts)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        diff = (ours.logits(ids) - hf(input_ids=ids).logits.float()).abs().max().item()
    tokens = args.batch * args.seq

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def fwd_ours() -> None:
        with torch.no_grad():
            ours.logits(ids)

    def fwd_hf() -> None:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)

    def bwd_ours() -> None:
        loss, _ = ours(ids, labels)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def bwd_hf() -> None:
        hf(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        hf.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def measure(fa, fb) -> tuple[float, float]:
        for _ in range(args.warmup):
            fa(), fb()
        ta, tb = [], []
        for _ in range(args.iters):  # alternate so drift on a shared machine hits both
            ta.append(timed(fa))
            tb.append(timed(fb))
        return tokens / min(ta), tokens / min(tb)  # best of N: robust to other load on a shared machine

    print(
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"HF experts={hf.config._experts_implementation}"
    )
    print(
        f"model: hidden={h} layers={args.layers} heads={args.heads} experts={args.experts} top-k={args.topk} "
        f"moe_inter={args.moe_inter} vocab={args.vocab}; batch={args.batch} seq={args.seq}; "
        f"max |logit diff| = {diff:.2e}"
    )
    if not args.moe_only:
        ours.eval(), hf.eval()
        a, b = measure(fwd_ours, fwd_hf)
        print(f"forward           moerun {a:10.0f} tok/s   HF {b:10.0f} tok/s   ratio {a / b:5.2f}x")
        ours.train(), hf.train()
        a, b = measure(bwd_ours, bwd_hf)
        print(f"forward+backward  moerun {a:10.0f} tok/s   HF {b:10.0f} tok/s   ratio {a / b:5.2f}x")
    # The routed-expert path alone (gate + dispatch + grouped experts + combine + shared), first MoE layer.
    layer = next(i for i in range(args.layers) if ours.model.layers[i].is_moe)
    x = torch.randn(args.batch, args.seq, h, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
    our_moe, hf_moe = ours.model.layers[layer].mlp, hf.model.layers[layer].mlp
    with torch.no_grad():
        moe_diff = (our_moe(x) - hf_moe(x)).abs().max().item()
    xg = x.clone().requires_grad_(True)

    def moe_fwd(m):
        def f() -> None:
            with torch.no_grad():
                m(x)

        return f

    def moe_bwd(m):
        def f() -> None:
            m(xg).square().mean().backward()
            m.zero_grad(set_to_none=True)

        return f

    a, b = measure(moe_fwd(our_moe), moe_fwd(hf_moe))
    print(
        f"MoE layer fwd     moerun {a:10.0f} tok/s   HF {b:10.0f} tok/s   ratio {a / b:5.2f}x"
        f"   (max |diff| {moe_diff:.1e})"
    )
    a, b = measure(moe_bwd(our_moe), moe_bwd(hf_moe))
    print(f"MoE layer fwd+bwd moerun {a:10.0f} tok/s   HF {b:10.0f} tok/s   ratio {a / b:5.2f}x")
    if args.expert_loop:
        ours.eval()
        for m in ours.modules():
            if isinstance(m, GroupedExperts):
                m.force_loop = True
        a, b = measure(fwd_ours, fwd_hf)
        print(f"forward (moerun per-expert loop) {a:10.0f} tok/s   HF {b:10.0f} tok/s   ratio {a / b:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
