"""Serving throughput over ZeroMQ vs Hugging Face `generate` on the same weights, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/serve.py [--requests 32] [--prompt 64] [--new 64]
    OMP_NUM_THREADS=1 .venv/bin/python bench/serve.py --preset small     # the small-dims V3-shaped model

Builds a random HF DeepseekV3 (size set by the flags), saves it, serves it with `runtime.serve.server.Server`
(thread in this process, loopback, port 0), and sends N concurrent greedy requests (prompt P, N new tokens)
from an asyncio client in a separate process (as a downstream service would: it does not share the
server's interpreter lock). HF then generates for the same prompts as one batch (its best case), at the
same torch thread count.

The default model has DeepSeek-V3's attention geometry (kv_lora_rank 512, rope 64, nope 128, v 128: the
dimensions that decide an MLA decode step's cost and cache size) with 8 heads, hidden 512, 4 layers and 16
experts, so that it runs on a CPU. transformers' DeepseekV3 caches the latent too but expands it through
kv_b_proj for every cached token at every step; moerun attends over the latent directly (absorbed form).
`--preset small` is a V3-shaped model with small attention dims (hidden 256, kv_lora_rank 64, rope 32, nope 32,
v 32; 8 heads, 4 layers, 16 experts top-4, vocab 2048): that expansion costs little and per-step overheads
decide. Explicit flags override a preset's values.

Prints tokens/s of each and the ratio, p50/p99 time to first token, and KV-cache bytes per token and layer:
ours (latent + rope key), HF's DynamicCache (measured from its tensors), and an MHA cache with the same heads.
Then the decode-step profile of the engine alone (no sockets; bench/stepprofile.py defines the split): mean
decode step time of the whole batch, split into model compute and host overhead, and tokens/s as a fraction
of this machine's measured fp32 matmul ceiling for the model's FLOPs per token.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


PRESETS = {
    # DeepSeek-V3's attention geometry at a CPU-sized width (the default)
    "v3-attn": dict(hidden=512, layers=4, heads=8, kv_lora_rank=512, rope_dim=64, nope_dim=128, v_dim=128,
                    experts=16, vocab=2048),
    # V3-shaped with small attention dims: per-step overheads decide
    "small": dict(hidden=256, layers=4, heads=8, kv_lora_rank=64, rope_dim=32, nope_dim=32, v_dim=32,
                  experts=16, vocab=2048),
}


def hf_config(hidden: int, layers: int, heads: int, kv_lora_rank: int, rope_dim: int, nope_dim: int, v_dim: int,
              experts: int, vocab: int) -> dict:
    """transformers DeepseekV3Config keys of a bench model (a PRESETS entry, or the flags that override one)."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                n_routed_experts=experts, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=hidden // 2,
                kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope_dim, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
                max_position_embeddings=1024)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="v3-attn",
                   help="model shape (default v3-attn); the flags below override its values")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (default 64)")
    p.add_argument("--new", type=int, default=64, help="generated tokens per request (default 64)")
    for name in ("hidden", "layers", "heads", "kv-lora-rank", "rope-dim", "nope-dim", "v-dim", "experts", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="torch threads (default: OMP_NUM_THREADS, else 2)")
    p.add_argument("--profile-steps", type=int, default=24,
                   help="decode steps timed (and then profiled) for the engine-alone step profile; 0 skips it")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate (quick iteration: no ratio)")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


async def run_clients(addr: str, prompts: list[list[int]], new: int) -> tuple[float, list[float], list[dict]]:
    from runtime.client import AsyncClient

    async with AsyncClient(addr) as c:
        await c.health()  # warm-up: one real generation

        async def one(p: list[int]) -> tuple[float, dict]:
            t0 = time.perf_counter()
            ttft, done = None, None
            async for msg in c.stream(prompt_ids=p, max_tokens=new, ignore_eos=True):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                done = msg
            return ttft, done

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return wall, [r[0] for r in res], [r[1] for r in res]


def client_process(addr: str, prompts: list[list[int]], new: int, conn) -> None:
    """The clients, in their own process; sends (wall, ttfts, dones) back over `conn`."""
    try:
        conn.send(asyncio.run(run_clients(addr, prompts, new)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(exc)
    finally:
        conn.close()


def run_clients_elsewhere(addr: str, prompts: list[list[int]], new: int) -> tuple[float, list[float], list[dict]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=client_process, args=(addr, prompts, new, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(600):
            raise TimeoutError("the client process gave no result within 600 s")
        result = parent.recv()
    finally:
        proc.join(timeout=30)
    if isinstance(result, BaseException):
        raise RuntimeError("client process failed") from result
    return result


def main() -> int:
    a = parse()
    torch.set_num_threads(a.threads)
    from hf_models import make_hf_model
    from stepprofile import decode_flops_per_token, matmul_ceiling_gflops, profile_decode

    import runtime
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine, SamplingParams
    from runtime.serve.server import Server

    cfg = hf_config(**{k: getattr(a, k) for k in PRESETS[a.preset]})
    tmp = tempfile.mkdtemp(prefix="moerun-bench-")
    path, hf = make_hf_model(tmp, "deepseek_v3", seed=0, max_shard_size="50MB", **cfg)
    hf.generation_config.eos_token_id = None
    model = runtime.load_model(path)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, a.vocab, (a.requests, a.prompt), generator=g)
    total_new = a.requests * a.new

    def make_engine():
        return Engine(model, max_batch=max(64, a.requests), max_model_len=a.prompt + a.new + 8,
                      max_prefill_tokens=2048, page_size=a.page_size,
                      kv_cache_tokens=a.requests * (a.prompt + a.new + a.page_size))

    srv = Server(Scheduler(make_engine()), bind="tcp://127.0.0.1:*").start()
    cpu0 = time.process_time()
    try:
        wall, ttfts, dones = run_clients_elsewhere(srv.endpoint, prompts.tolist(), a.new)
    finally:
        srv.stop()
    ours_cpu = time.process_time() - cpu0  # this process: the server thread and the engine (not the clients)
    assert all(len(d["ids"]) == a.new for d in dones)
    ours_tps = total_new / wall

    hf_tps = same = hf_bytes = None
    hf_wall = 0.0
    with torch.no_grad():
        if not a.no_hf:
            hf.generate(prompts[:2, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), max_new_tokens=2,
                        do_sample=False, pad_token_id=0)  # warm-up
            t0, cpu0 = time.perf_counter(), time.process_time()
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True)
            hf_wall, hf_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            hf_tps = total_new / hf_wall
            same = sum(d["ids"] == out.sequences[i, a.prompt:].tolist() for i, d in enumerate(dones))
        # HF's cache bytes per token and layer, measured from its tensors after a short forward
        fwd = hf(prompts[:1, :16], use_cache=True)
        kv = fwd.past_key_values
        layer0 = kv.layers[0] if hasattr(kv, "layers") else None
        tensors = [layer0.keys, layer0.values] if layer0 is not None else list(kv[0])
        hf_bytes = sum(t.numel() * t.element_size() for t in tensors) // 16

    elem = model.lm_head.weight.element_size()
    ours_bytes = (a.kv_lora_rank + a.rope_dim) * elem
    mha_bytes = a.heads * ((a.nope_dim + a.rope_dim) + a.v_dim) * elem
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
    print(f"model: preset {a.preset}: hidden {a.hidden}, {a.layers} layers, {a.heads} heads, kv_lora_rank "
          f"{a.kv_lora_rank}, rope {a.rope_dim}, nope {a.nope_dim}, v {a.v_dim}, {a.experts} experts, vocab {a.vocab}; "
          f"torch threads {a.threads}; load average {os.getloadavg()[0]:.2f}")
    print(f"requests {a.requests} x (prompt {a.prompt} + new {a.new}) tokens")
    print(f"moerun serve (ZeroMQ, continuous batching): {ours_tps:8.1f} tok/s   wall {wall:.2f} s   "
          f"TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms  p99 {p99 * 1e3:.0f} ms")
    if hf_tps is not None:
        print(f"HF generate (whole batch at once):          {hf_tps:8.1f} tok/s   wall {hf_wall:.2f} s")
        print(f"throughput ratio moerun / HF: {ours_tps / hf_tps:.2f}x   (greedy outputs identical for {same}/"
              f"{a.requests} requests)")
        print(f"CPU seconds in this process: moerun {ours_cpu:.2f} (server thread + engine), HF {hf_cpu:.2f}; "
              f"ratio HF / moerun {hf_cpu / ours_cpu:.2f}x (less sensitive to other load than wall time)")
    print(f"KV cache bytes per token per layer: moerun {ours_bytes} (latent {a.kv_lora_rank} + rope {a.rope_dim} "
          f"values), HF DynamicCache {hf_bytes}, MHA same heads {mha_bytes}")
    print(f"  moerun / HF = {ours_bytes / hf_bytes:.3f}   moerun / MHA = {ours_bytes / mha_bytes:.3f}   "
          f"HF / MHA = {hf_bytes / mha_bytes:.3f}")

    ceiling = matmul_ceiling_gflops(a.threads)
    flops = decode_flops_per_token(model.config, a.prompt + a.new // 2)
    ceiling_tps = ceiling * 1e9 / flops
    print(f"matmul ceiling {ceiling:.1f} GFLOP/s (fp32 1024^3 mm, {a.threads} threads); model "
          f"{flops / 1e6:.2f} MFLOP per decode token (context {a.prompt + a.new // 2}) -> ceiling "
          f"{ceiling_tps:.0f} tok/s; moerun serve at {100 * ours_tps / ceiling_tps:.1f}% of it")
    if a.profile_steps > 0:
        def add_requests(engine) -> None:
            for i, p in enumerate(prompts.tolist()):
                engine.add_request(str(i), p, SamplingParams(max_tokens=a.new, ignore_eos=True))

        prof = profile_decode(make_engine, add_requests, a.requests, min(a.profile_steps, a.new - 4))
        step_tps = prof["tokens_per_step"] / (prof["step_ms"] / 1e3)
        print(f"decode step (engine alone, {a.requests} sequences, mean of {prof['steps']} steps): "
              f"{prof['step_ms']:.2f} ms (CPU {prof['step_cpu_ms']:.2f} ms); under the profiler "
              f"{prof['profiled_ms']:.2f} ms = model compute {prof['compute_ms']:.2f} ms + host overhead "
              f"{prof['host_ms']:.2f} ms  "
              f"({prof['ops_per_step']:.0f} aten ops per step, operator call {prof['op_call_us']:.1f} us)")
        print(f"  decode {step_tps:.0f} tok/s = {100 * step_tps / ceiling_tps:.1f}% of the matmul ceiling; "
              f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
