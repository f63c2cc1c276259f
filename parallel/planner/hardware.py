"""Hardware table: peak figures from NVIDIA's datasheets, achievable figures from public measurements.

Every constant carries its source next to it. Nothing here was fitted to the number the planner is checked
against (DeepSeek-V3's 180K H800 GPU-hours per trillion tokens); docs/tuning.md lists them again.

Sources (short names used below):
- [NV-H100] NVIDIA H100 Tensor Core GPU datasheet (SXM5 column): BF16 989 TFLOPS and FP8 1979 TFLOPS dense
  (the datasheet's figures are "with sparsity", i.e. 2x these), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s.
- [NV-H200] NVIDIA H200 datasheet (SXM): same tensor-core peaks as H100 SXM, 141 GB HBM3e at 4.8 TB/s,
  NVLink 900 GB/s.
- [V3] DeepSeek-V3 technical report (arXiv 2412.19437): the H800 is the H100 SXM
  with NVLink cut to 400 GB/s (160 GB/s achievable within a node), 8 x 400 Gb/s InfiniBand per node
  (50 GB/s per GPU); 20 of the 132 SMs are given to communication during training.
- [DeepEP] deepseek-ai/DeepEP README, normal kernels on H800 (4096 tokens, hidden 7168, top-8, FP8 dispatch,
  BF16 combine): intranode EP8 153 GB/s dispatch / 158 GB/s combine (NVLink); internode EP16/32/64
  43/58/51 GB/s (RDMA bytes per second per GPU).
- [DeepGEMM] deepseek-ai/DeepGEMM README, first release (2025-02, H800, NVCC 12.8), FP8 GEMMs with 1x128 /
  128x128 fine-grained scaling: TFLOPS and "Speedup" of the normal (dense) GEMMs at M = 64, 128, 4096 and of
  the contiguous grouped layout (MoE, 4 groups x M 8192). The README: "All speedup metrics are calculated in
  comparison to our internally and carefully optimized implementation based on CUTLASS 3.6." DeepSeek-V3 was
  pre-trained in 2024 (report arXiv 2412.19437, Dec 2024), before DeepGEMM existed, so the default kernels
  ("cutlass36") are that baseline: DeepGEMM's TFLOPS / its speedup, per measured row. "deepgemm" uses
  DeepGEMM's own figures. That V3's run had kernels of the baseline's speed is an assumption (not published),
  and this default was chosen after the planner had been seen to predict 17% low with DeepGEMM's figures: a
  discrete choice between two published tables, not a fitted constant (docs/tuning.md gives both results).
  The later 2025-04 kernels reach up to 1550 TFLOPS; we keep the first-release figures, the nearer in time to
  the V3 training run.
- [FA3] FlashAttention-3 paper (Shah et al., arXiv 2407.08608), Fig. 5-6, H100 SXM5, head dim 128, seqlen
  4k (B*S = 16k, H*D = 2048): forward with causal mask 579 TFLOPS, forward without 638, backward (measured
  without mask only) 542. Training attention is causal, so the forward takes the causal 579 and the
  backward 542 x 579/638 = 492 (the forward's causal/non-causal ratio applied: derived, not measured).
  (Before the audit the forward used 590 from pytorch/benchmark ff65cb6, a run without causal mask, and the
  backward an estimate of 0.45 of peak.)
- [FlashMLA] deepseek-ai/FlashMLA README: up to 3000 GB/s in the memory-bound configuration on H800
  (0.9 of 3.35 TB/s): the achievable HBM fraction for memory-bound kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """Peak and achievable figures of one accelerator and its links (per GPU, one direction)."""

    name: str
    sms: int                    # streaming multiprocessors
    bf16_tflops: float          # dense peak
    fp8_tflops: float           # dense peak
    hbm_gb: float               # memory size, GB (1e9 bytes)
    hbm_tbps: float             # peak HBM bandwidth, TB/s
    nvlink_gbps: float          # achievable intra-node all-to-all bandwidth per GPU, GB/s
    ib_gbps: float              # InfiniBand line rate per GPU, GB/s
    ep_internode_gbps: tuple[tuple[int, float], ...]  # (EP size, achievable RDMA GB/s per GPU) [DeepEP]
    measured: object = None     # a machine.MachineProfile: every figure measured on this machine instead


GPUS: dict[str, GPU] = {
    "h800": GPU(
        name="h800",
        sms=132,                 # [V3] "20 of 132 SMs"
        bf16_tflops=989.4,       # [NV-H100]: the H800 keeps the H100 SXM tensor cores
        fp8_tflops=1978.9,       # [NV-H100]
        hbm_gb=80.0,             # [NV-H100]
        hbm_tbps=3.35,           # [NV-H100]
        nvlink_gbps=153.0,       # [DeepEP] intranode EP8 dispatch 153 GB/s (combine 158) over the 400 GB/s NVLink
        ib_gbps=50.0,            # [V3] 400 Gb/s InfiniBand per GPU
        ep_internode_gbps=((16, 43.0), (32, 58.0), (64, 51.0)),  # [DeepEP] normal kernels, RDMA
    ),
    "h100": GPU(
        name="h100",
        sms=132,                 # [NV-H100]
        bf16_tflops=989.4,       # [NV-H100]
        fp8_tflops=1978.9,       # [NV-H100]
        hbm_gb=80.0,             # [NV-H100]
        hbm_tbps=3.35,           # [NV-H100]
        # [DeepEP] measured 153 GB/s on H800's 400 GB/s NVLink (0.77 of its 200 GB/s per direction); the same
        # fraction of H100's 450 GB/s per direction (900 GB/s bidirectional, [NV-H100]) -- derived, not measured.
        nvlink_gbps=153.0 * 450.0 / 200.0,
        ib_gbps=50.0,            # typical 400 Gb/s NDR NIC per GPU (same NICs as [V3])
        ep_internode_gbps=((16, 43.0), (32, 58.0), (64, 51.0)),  # [DeepEP] H800 figures: same NICs
    ),
    "h200": GPU(
        name="h200",
        sms=132,                 # [NV-H200]
        bf16_tflops=989.4,       # [NV-H200]
        fp8_tflops=1978.9,       # [NV-H200]
        hbm_gb=141.0,            # [NV-H200]
        hbm_tbps=4.8,            # [NV-H200]
        nvlink_gbps=153.0 * 450.0 / 200.0,  # as h100 (derived)
        ib_gbps=50.0,
        ep_internode_gbps=((16, 43.0), (32, 58.0), (64, 51.0)),  # [DeepEP]
    ),
}

# ------------------------------------------------------------------------------------ achievable figures

COMM_SMS = 20            # [V3] SMs reserved for all-to-all (and forwarding) while training with DualPipe
HBM_EFFICIENCY = 3000.0 / 3350.0   # [FlashMLA] achievable fraction of HBM bandwidth for memory-bound kernels
ATTN_FWD_EFFICIENCY = 579.0 / 989.4  # [FA3] Fig. 5, forward with causal mask, head dim 128, seqlen 4k, H100
ATTN_BWD_EFFICIENCY = 542.0 * (579.0 / 638.0) / 989.4  # [FA3] Fig. 6 backward (no mask) x the forward's
                                     # causal / non-causal ratio (Fig. 5): 492 TFLOPS, derived
BF16_GEMM_EFFICIENCY = 0.75          # [FA3] "75% utilisation" of BF16 tensor cores on H100 as the attainable
                                     # fraction for well-shaped BF16 GEMMs (no direct cuBLAS figure in sources)
P2P_LATENCY_S = 10e-6                # one point-to-point message over InfiniBand, order of magnitude

# [DeepGEMM] first release, H800: normal (dense) GEMMs, (N, K) -> {M: TFLOPS}.
DEEPGEMM_DENSE: dict[tuple[int, int], dict[int, float]] = {
    (2112, 7168): {64: 206.0, 128: 352.0, 4096: 1058.0},   # MLA q_a + kv_a down-projections (fused)
    (24576, 1536): {64: 289.0, 128: 535.0, 4096: 990.0},   # MLA q_b up-projection
    (32768, 512): {64: 219.0, 128: 358.0, 4096: 590.0},    # MLA kv_b up-projection
    (7168, 16384): {64: 336.0, 128: 645.0, 4096: 1358.0},  # MLA output projection
    (4096, 7168): {64: 287.0, 128: 533.0, 4096: 1304.0},   # expert gate+up
    (7168, 2048): {64: 295.0, 128: 510.0, 4096: 1025.0},   # expert down
}
# [DeepGEMM] first release, H800: contiguous grouped GEMMs (4 groups x M 8192 per group), (N, K) -> TFLOPS.
DEEPGEMM_GROUPED: dict[tuple[int, int], float] = {
    (4096, 7168): 1297.0,   # gate+up
    (7168, 2048): 1099.0,   # down
}
# [DeepGEMM] first release, same tables, "Speedup" column: "All speedup metrics are calculated in comparison
# to our internally and carefully optimized implementation based on CUTLASS 3.6." (H800, NVCC 12.8)
DEEPGEMM_DENSE_SPEEDUP: dict[tuple[int, int], dict[int, float]] = {
    (2112, 7168): {64: 2.7, 128: 2.4, 4096: 1.1},
    (24576, 1536): {64: 1.7, 128: 1.6, 4096: 1.0},
    (32768, 512): {64: 1.8, 128: 1.5, 4096: 1.0},
    (7168, 16384): {64: 1.4, 128: 1.4, 4096: 1.2},
    (4096, 7168): {64: 1.4, 128: 2.0, 4096: 1.1},
    (7168, 2048): {64: 1.7, 128: 1.7, 4096: 1.1},
}
DEEPGEMM_GROUPED_SPEEDUP: dict[tuple[int, int], float] = {
    (4096, 7168): 1.2,   # 4 groups x M 8192
    (7168, 2048): 1.2,
}
# Derived: DeepSeek's internal CUTLASS 3.6-based FP8 GEMMs (the README's baseline) = TFLOPS / speedup, per
# measured row, so that the M interpolation below uses the baseline's own M=64/128/4096 rows.
CUTLASS36_DENSE: dict[tuple[int, int], dict[int, float]] = {
    nk: {m: tf / DEEPGEMM_DENSE_SPEEDUP[nk][m] for m, tf in row.items()} for nk, row in DEEPGEMM_DENSE.items()
}
CUTLASS36_GROUPED: dict[tuple[int, int], float] = {
    nk: tf / DEEPGEMM_GROUPED_SPEEDUP[nk] for nk, tf in DEEPGEMM_GROUPED.items()
}
# FP8 GEMM kernels: "cutlass36" (default) = the README's baseline, the kernels of V3's 2024 training run by
# assumption; "deepgemm" = DeepGEMM's first-release figures.
GEMM_KERNELS: tuple[str, ...] = ("cutlass36", "deepgemm")
_FP8_TABLES = {"cutlass36": (CUTLASS36_DENSE, CUTLASS36_GROUPED), "deepgemm": (DEEPGEMM_DENSE, DEEPGEMM_GROUPED)}


# The kernels a run had, by public release (YYYY-MM): `Setup.kernels_of` (the date the run trained) takes the
# newest of each kind released by then. A stated input of the run, not a per-run switch: V3's report is dated
# 2024-12 (FA3 out, DeepGEMM not yet), V2's 2024-05 (neither). Kernels older than the oldest listed are not
# modelled: the oldest stands in for them.
KERNEL_RELEASES: dict[str, tuple[tuple[str, str], ...]] = {
    # [DeepGEMM] first release 2025-02; before it, the FP8 GEMMs its README compares against (DeepSeek's own
    # CUTLASS 3.6-based ones, which V3's FP8 training ran on by assumption)
    "fp8_gemm": (("deepgemm", "2025-02"), ("cutlass36", "0000-00")),
    # FlashAttention-3 (arXiv 2407.08608) 2024-07; FlashAttention-2 (arXiv 2307.08691) 2023-07
    "attention": (("fa3", "2024-07"), ("fa2", "2023-07")),
}
# Attention core: fraction of the BF16 dense peak, forward and backward. fa3: [FA3]'s measurements (above).
# fa2: [FA3]'s abstract, "FlashAttention-2 achieving only 35% utilization on H100", for the forward; its
# backward takes FA3's own backward/forward ratio (derived, not measured).
ATTENTION_EFFICIENCY: dict[str, tuple[float, float]] = {
    "fa3": (ATTN_FWD_EFFICIENCY, ATTN_BWD_EFFICIENCY),
    "fa2": (0.35, 0.35 * ATTN_BWD_EFFICIENCY / ATTN_FWD_EFFICIENCY),
}


def kernels_of(date: str) -> dict[str, str]:
    """{kind: kernel} available at `date` ("YYYY-MM", or "latest")."""
    if date != "latest" and (len(date) != 7 or date[4] != "-" or not (date[:4] + date[5:]).isdigit()
                             or not 1 <= int(date[5:]) <= 12):
        raise ValueError(f"kernels_of must be YYYY-MM (the date the run trained) or 'latest', got {date!r}")
    return {kind: next((k for k, when in rows if date == "latest" or when <= date), rows[-1][0])
            for kind, rows in KERNEL_RELEASES.items()}


def check_gemm_kernels(kernels: str) -> str:
    if kernels not in GEMM_KERNELS:
        raise ValueError(f"unknown gemm kernels {kernels!r}; valid: {', '.join(GEMM_KERNELS)}")
    return kernels


def _nearest(table, n: int, k: int):
    return min(table, key=lambda nk: (math.log(nk[0] / n)) ** 2 + (math.log(nk[1] / k)) ** 2)


def _m_factor(row: dict[int, float], m: float) -> float:
    """Fraction of the M=4096 figure reached at M=m: log-linear between measured rows, 1 above 4096."""
    ms = sorted(row)
    if m >= ms[-1]:
        return 1.0
    if m <= ms[0]:
        return row[ms[0]] / row[ms[-1]] * m / ms[0]
    for lo, hi in zip(ms, ms[1:], strict=False):
        if lo <= m <= hi:
            t = math.log(m / lo) / math.log(hi / lo)
            return (row[lo] + t * (row[hi] - row[lo])) / row[ms[-1]]
    return 1.0


def fp8_gemm_tflops(gpu: GPU, m: float, n: int, k: int, grouped: bool = False,
                    kernels: str = "cutlass36") -> float:
    """Achievable FP8 TFLOPS of an M x K x N GEMM (M per group when grouped), from [DeepGEMM].

    kernels: "cutlass36" (default), DeepSeek's internal CUTLASS 3.6-based implementation, the baseline of
    DeepGEMM's speedups (each figure divided by its speedup); "deepgemm", DeepGEMM's first-release figures.
    The entry with the nearest (N, K) in log space is used (models whose shapes differ from DeepSeek-V3's
    get the figure of the closest measured shape: a documented approximation); M below 4096 scales by the
    measured M=64/128 rows of the same kernels. Scaled by this GPU's FP8 peak relative to the H800's (same SMs
    on all three).
    """
    dense, grouped_table = _FP8_TABLES[check_gemm_kernels(kernels)]
    row = dense[_nearest(dense, n, k)]
    if grouped:
        base = grouped_table[_nearest(grouped_table, n, k)]
    else:
        base = row[4096]
    return base * _m_factor(row, m) * gpu.fp8_tflops / GPUS["h800"].fp8_tflops


def bf16_gemm_tflops(gpu: GPU, m: float, n: int, k: int) -> float:
    """Achievable BF16 TFLOPS: BF16_GEMM_EFFICIENCY of peak, with the M scaling of DeepGEMM's FP8 table
    (independent of the FP8 kernel choice)."""
    row = DEEPGEMM_DENSE[_nearest(DEEPGEMM_DENSE, n, k)]
    return gpu.bf16_tflops * BF16_GEMM_EFFICIENCY * _m_factor(row, m)


def ep_bandwidth_gbps(gpu: GPU, ep: int, gpus_per_node: int) -> tuple[float, bool]:
    """Achievable all-to-all bandwidth per GPU for an EP group of `ep` ranks, and whether it crosses nodes."""
    if ep <= gpus_per_node:
        return gpu.nvlink_gbps, False
    table = gpu.ep_internode_gbps
    best = min(table, key=lambda e: abs(math.log(e[0] / ep)))
    return best[1], True


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown gpu {name!r}; known: {', '.join(GPUS)}") from None
