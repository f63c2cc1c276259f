"""`make gpu-check`: the checks that need a GPU, in one command, one verdict line per check.

    python tools/gpu_check.py [--only NAME ...] [--list]

On a machine with a CUDA device it runs (meant to take well under 8 minutes on one H100):
- model: builtin:tiny's logits, loss and every parameter gradient on CUDA against the same model on CPU
  (fp32, TF32 off, torch kernels);
- bf16-train: `moerun train` of builtin:tiny in bfloat16 for 40 steps on this GPU: finite losses that fall,
  and the job held GPU memory while it ran;
- triton-*: every Triton kernel compiled for this GPU (not interpreted) against its torch twin, in bf16 (the
  production dtype) and fp32, at DeepSeek-V3 widths where a width is fixed (MLA latent 512, rope 64);
  and builtin:tiny's logits with the Triton kernels (what `auto` picks on CUDA) against CPU;
- serve: `moerun serve --model builtin:tiny` with a greedy generation over ZeroMQ, checked token by token
  against the CPU model, and the server process holding GPU memory while it serves.
Each line reads `gpu-check: PASS|FAIL <name>: <detail> [<seconds>]`; the exit code is 1 when any check
failed. Without a CUDA device it prints one line `gpu-check: SKIP: ...` and exits 0 (CI runs that).

Written without access to a GPU: unverified on hardware until someone runs it on one (docs/pipeline.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# Where the checks put their tensors, and their low-precision dtype. Only tests change them ("cpu" and
# float16, under TRITON_INTERPRET=1, whose bf16 is broken) to run the checks' own code without a GPU.
DEVICE = "cuda"
LOW = "bfloat16"


class CheckFailed(AssertionError):
    """A check's verdict is FAIL; the message says what was seen."""


def _close(name: str, got, ref, atol: float, rel_to_max: bool = False, rtol: float = 0.0) -> str:
    """|got - ref| <= atol (times max |ref| when rel_to_max) + rtol * |ref| everywhere; returns the max abs
    error for the verdict line."""
    g, r = got.detach().float().cpu(), ref.detach().float().cpu()
    if g.shape != r.shape:
        raise CheckFailed(f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}")
    if not g.numel():
        return f"{name} (empty)"
    diff = (g - r).abs()
    bound = atol * (float(r.abs().max()) if rel_to_max else 1.0) + rtol * r.abs()
    err = float(diff.max())
    if not bool((diff <= bound).all()):  # also catches NaN
        i = int((diff - bound).flatten().nan_to_num(float("inf")).argmax())
        raise CheckFailed(f"{name}: error {float(diff.flatten()[i]):.3g} at {float(r.flatten()[i]):.4g} exceeds "
                          f"{float(bound.flatten()[i]):.3g} (max abs error {err:.3g})")
    return f"{name} {err:.1e}"


def _low():
    import torch

    return getattr(torch, LOW)


def _gpu_used_mib() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / MIB


def _watch_gpu_memory(proc: subprocess.Popen, baseline: float, until: Callable[[], bool] | None = None) -> float:
    """Largest rise of device-wide GPU memory in use over `baseline` while `proc` runs (or until `until`)."""
    peak = 0.0
    while proc.poll() is None and not (until and until()):
        peak = max(peak, _gpu_used_mib() - baseline)
        time.sleep(0.2)
    return peak


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    env.pop("MOERUN_BACKEND", None)
    return env


# ---------------------------------------------------------------------------------------------- checks

def check_model() -> str:
    import torch
    import torch.nn.functional as F

    import runtime

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ["MOERUN_KERNELS"] = "torch"
    try:
        cpu = runtime.load_model("builtin:tiny", mtp=False).train()
        gpu = runtime.load_model("builtin:tiny", mtp=False, device=DEVICE).train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cpu.config.vocab_size, (2, 32), generator=g)
        labels = torch.randint(0, cpu.config.vocab_size, (2, 32), generator=g)
        out = {}
        for name, model in (("cpu", cpu), ("cuda", gpu)):
            dev = next(model.parameters()).device
            logits = model(ids.to(dev)).float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.to(dev).flatten())
            loss.backward()
            out[name] = (logits, loss)
        if next(gpu.parameters()).device.type != DEVICE:
            raise CheckFailed(f"load_model(..., device={DEVICE!r}) left the parameters on the CPU")
        figs = [_close("logits", out["cuda"][0], out["cpu"][0], 1e-4),
                _close("loss", out["cuda"][1], out["cpu"][1], 1e-5)]
        worst, where = 0.0, ""
        ref = dict(cpu.named_parameters())
        for n, p in gpu.named_parameters():
            if p.grad is None or ref[n].grad is None:
                if (p.grad is None) != (ref[n].grad is None):
                    raise CheckFailed(f"gradient of {n} exists on one device only")
                continue
            err = float((p.grad.float().cpu() - ref[n].grad.float()).abs().max())
            tol = 1e-4 + 1e-3 * float(ref[n].grad.abs().max())
            if not err <= tol:
                raise CheckFailed(f"grad {n}: max abs error {err:.3g} > {tol:.3g}")
            worst, where = max((worst, where), (err, n))
        return ", ".join(figs) + f", grads {worst:.1e} (worst {where})"
    finally:
        os.environ.pop("MOERUN_KERNELS", None)


def check_bf16_train() -> str:
    steps = 40
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "job.toml"
        cfg.write_text(f"""
[model]
path = "builtin:tiny"
dtype = "bfloat16"
[train]
steps = {steps}
lr = 3e-3
warmup_steps = 5
global_batch = 8
out = "{tmp}/run"
save_every = 0
resume = false
[data]
path = "builtin:tinytext"
seq_len = 64
""")
        base = _gpu_used_mib()
        proc = subprocess.Popen([sys.executable, "-m", "launch", "train", str(cfg)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rise = _watch_gpu_memory(proc, base)
        out = proc.communicate(timeout=300)[0]
        if proc.returncode != 0:
            raise CheckFailed(f"moerun train exited {proc.returncode}: {out[-800:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    if len(losses) != steps or not all(x == x and abs(x) != float("inf") for x in losses):
        raise CheckFailed(f"{len(losses)} steps logged, losses {losses[:3]}...{losses[-3:]}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    if not last < 0.9 * first:
        raise CheckFailed(f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}")
    if rise < 64:
        raise CheckFailed(f"the training job added only {rise:.0f} MiB of GPU memory: did it run on the CPU?")
    return f"loss {first:.3f} -> {last:.3f} over {steps} steps, job held {rise:.0f} MiB of GPU memory"


def _triton_rmsnorm() -> str:
    import torch

    from ops.norm import rms_norm as twin
    from ops.triton.rmsnorm import rms_norm

    g = torch.Generator().manual_seed(7)
    figs = []
    for dtype, tol, rtol in ((torch.float32, 1e-5, 1e-5), (_low(), 1e-2, 1.6e-2)):  # bf16: two roundings
        x = torch.randn(300, 7168, generator=g).to(dtype).to(DEVICE)
        w = (1 + torch.randn(7168, generator=g) / 10).to(dtype).to(DEVICE)
        res = torch.randn(300, 7168, generator=g).to(dtype).to(DEVICE)
        figs.append(_close(f"{str(dtype)[6:]} plain", rms_norm(x, w, 1e-6), twin(x.float(), w.float(), 1e-6), tol,
                           rtol=rtol))
        y, s = rms_norm(x, w, 1e-6, residual=res)
        figs.append(_close(f"{str(dtype)[6:]} +residual", y, twin((x + res).float(), w.float(), 1e-6), tol,
                           rtol=rtol))
        if not torch.equal(s, x + res):
            raise CheckFailed("the residual sum differs from x + residual")
    return ", ".join(figs)


def _triton_grouped_gemm() -> str:
    import torch

    from ops.moe import grouped_linear as twin_linear
    from ops.moe import grouped_swiglu as twin_swiglu
    from ops.triton.grouped_gemm import grouped_linear, grouped_swiglu

    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([0, 37, 0, 200, 5, 1, 0, 65])  # uneven loads, empty experts first / middle / last
    m, k, n = int(counts.sum()), 328, 200  # K and N not multiples of the default 32 / 64 blocks
    figs = []
    for dtype in (_low(), torch.float32):  # fp32 runs the tensor cores in TF32
        x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        gate, up = ((torch.randn(8, n, k, generator=g) / 20).to(dtype).to(DEVICE) for _ in range(2))
        down = (torch.randn(8, k, n, generator=g) / 20).to(dtype).to(DEVICE)
        c = counts.to(DEVICE)
        name = str(dtype)[6:]
        figs.append(_close(f"{name} linear", grouped_linear(x, gate, c),
                           twin_linear(x.float(), gate.float(), c, force_loop=True), 2e-2, rel_to_max=True))
        figs.append(_close(f"{name} swiglu", grouped_swiglu(x, gate, up, down, c),
                           twin_swiglu(x.float(), gate.float(), up.float(), down.float(), c, force_loop=True),
                           2e-2, rel_to_max=True))
    return ", ".join(figs)


def _triton_mla_decode() -> str:
    import torch

    from ops.paged_attention import mla_decode_paged as twin
    from ops.paged_attention import new_kv_pages, write_kv
    from ops.triton.mla_decode import mla_decode_paged

    r, dr, heads, page = 512, 64, 16, 64
    lens = [1, 300, 0, 129]
    g = torch.Generator().manual_seed(3)
    b = len(lens)
    max_pages = -(-max(lens) // page) + 1
    kv = new_kv_pages(b * max_pages, page, r, dr)
    table = torch.randperm(b * max_pages, generator=g)[: b * max_pages].view(b, max_pages).int()
    pos = torch.full((b, max(lens)), -1)
    for i, n in enumerate(lens):
        pos[i, :n] = torch.arange(n)
    write_kv(kv, table, pos, torch.randn(b, max(lens), r, generator=g), torch.randn(b, max(lens), dr, generator=g))
    q, qpe = torch.randn(b, heads, r, generator=g), torch.randn(b, heads, dr, generator=g)
    seq = torch.tensor(lens, dtype=torch.int32)
    ref = twin(q, qpe, kv, table, seq, 0.05)
    figs = []
    for dtype in (_low(), torch.float32):
        args = [t.to(dtype).to(DEVICE) for t in (q, qpe, kv)] + [table.to(DEVICE), seq.to(DEVICE)]
        for splits in (1, 4):
            out = mla_decode_paged(*args, 0.05, num_splits=splits)
            figs.append(_close(f"{str(dtype)[6:]} splits={splits}", out, ref, 2e-2, rel_to_max=True))
    return ", ".join(figs)


def _triton_fp8() -> str:
    import torch

    from ops.fp8 import block_quantize
    from ops.fp8_train import fp8_gemm_ref, quantize_1x128
    from ops.triton.fp8 import fp8_gemm, quantize_act, quantize_weight

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, -(grid[1:] + grid[:-1]) / 2]).clamp(-448, 448)
    rows = -(-vals.numel() // 127)
    body = torch.zeros(rows * 127)
    body[: vals.numel()] = vals
    x = torch.cat([torch.full((rows, 1), 448.0), body.view(rows, 127), torch.randn(rows, 72)], dim=1)
    q, s = quantize_act(x.to(DEVICE))
    rq, rs = quantize_1x128(x)
    bad = int((q.cpu().view(torch.uint8) != rq.view(torch.uint8)).sum())
    if bad or not torch.equal(s.cpu(), rs):
        raise CheckFailed(f"quantize_act: {bad} of {q.numel()} e4m3 values (or the scales) differ from the twin's "
                          "(every e4m3 value and midpoint: the rounding mode)")
    w = torch.randn(300, 520) * torch.logspace(-3, 2, 520)
    qw, sw = quantize_weight(w.to(DEVICE))
    rqw, rsw = block_quantize(w)
    if not (torch.equal(qw.cpu().view(torch.uint8), rqw.view(torch.uint8)) and torch.equal(sw.cpu(), rsw)):
        raise CheckFailed("quantize_weight differs from block_quantize")
    g = torch.Generator().manual_seed(9)
    a, bmat = torch.randn(200, 1024, generator=g), torch.randn(768, 1024, generator=g) * 3
    aq, asc = quantize_1x128(a)
    bq, bsc = block_quantize(bmat)
    ref = fp8_gemm_ref(aq, asc, bq, bsc)
    figs = ["quantize bit-exact"]
    for out_dtype, tol in ((torch.float32, 1e-3), (_low(), 1e-2)):
        c = fp8_gemm(aq.to(DEVICE), asc.to(DEVICE), bq.to(DEVICE), bsc.to(DEVICE), out_dtype=out_dtype)
        figs.append(_close(f"gemm {str(out_dtype)[6:]}", c, ref, tol, rel_to_max=True))
    return ", ".join(figs)


def _triton_model_logits() -> str:
    import torch

    import runtime

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = runtime.load_model("builtin:tiny").logits(ids)
        os.environ["MOERUN_KERNELS"] = "triton"
        try:
            got = runtime.load_model("builtin:tiny", device=DEVICE).logits(ids.to(DEVICE))
        finally:
            os.environ.pop("MOERUN_KERNELS", None)
    return _close("logits", got, ref, 2e-3, rel_to_max=True)


def check_serve() -> str:
    import torch

    import runtime
    from runtime.client import Client

    base = _gpu_used_mib()
    proc = subprocess.Popen([sys.executable, "-m", "launch", "serve", "--model", "builtin:tiny", "--bind",
                             "tcp://127.0.0.1:*"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        if "listening on " not in line:
            raise CheckFailed(f"no start-up line from moerun serve: {line}{proc.stdout.read()[-800:]}")
        addr = line.split("listening on ")[1].split()[0]
        prompt = [5, 17, 42, 99, 3, 250]
        with Client(addr, timeout=120) as client:
            reply = client.generate(prompt_ids=prompt, max_tokens=24, temperature=0.0, logprobs=2)
        rise = max(0.0, _gpu_used_mib() - base)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    got = reply["ids"]
    if len(got) != 24:
        raise CheckFailed(f"asked for 24 tokens, got {len(got)} ({reply.get('finish_reason')})")
    model = runtime.load_model("builtin:tiny")  # the CPU reference: greedy, the whole prefix each step
    ids = list(prompt)
    with torch.no_grad():
        for i, tok in enumerate(got):
            top = model.logits(torch.tensor([ids]))[0, -1].topk(2)
            best, margin = int(top.indices[0]), float(top.values[0] - top.values[1])
            if tok != best:
                if margin < 1e-3:  # a near tie: CUDA may pick the other; the sequences part here
                    break
                raise CheckFailed(f"token {i}: served {tok}, the CPU model picks {best} (margin {margin:.3g})")
            ids.append(tok)
    if rise < 64:
        raise CheckFailed(f"generation matches, but the server added only {rise:.0f} MiB of GPU memory: it served "
                          "from the CPU")
    return (f"{len(got)} greedy tokens equal the CPU model's ({i + 1} compared), server held {rise:.0f} MiB of GPU "
            "memory")


CHECKS: dict[str, Callable[[], str]] = {
    "model": check_model,
    "bf16-train": check_bf16_train,
    "triton-rmsnorm": _triton_rmsnorm,
    "triton-grouped-gemm": _triton_grouped_gemm,
    "triton-mla-decode": _triton_mla_decode,
    "triton-fp8": _triton_fp8,
    "triton-model-logits": _triton_model_logits,
    "serve": check_serve,
}


def run_checks(checks: dict[str, Callable[[], str]], out=print) -> int:
    """Run each check, print its verdict line; 1 if any failed."""
    failed = 0
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            detail, verdict = fn(), "PASS"
        except Exception as e:  # noqa: BLE001 - a crash is a FAIL of that check, the others still run
            detail, verdict = f"{type(e).__name__}: {e}" if not isinstance(e, CheckFailed) else str(e), "FAIL"
            failed += 1
        detail = " ".join(detail.split())[:600]
        out(f"gpu-check: {verdict} {name}: {detail} [{time.perf_counter() - t0:.1f} s]")
    return 1 if failed else 0


def skip_reason() -> str | None:
    """Why the checks cannot run here (no CUDA device), or None."""
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
                "torch.cuda.is_available() is False)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the Triton checks must compile, unset it"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(CHECKS), help="run only this check (repeatable)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    why = skip_reason()
    if why is not None:
        print(f"gpu-check: SKIP: {why}")
        return 0
    import torch

    print(f"gpu-check: on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})",
          flush=True)
    t0 = time.perf_counter()
    rc = run_checks({k: v for k, v in CHECKS.items() if not args.only or k in args.only},
                    out=lambda s: print(s, flush=True))
    print(f"gpu-check: {'FAILED' if rc else 'all passed'} in {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
