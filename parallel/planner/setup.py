"""What a layout does not decide: the training shape, precision, the kernels of the run's date, routing
limits on the load, and what the training code keeps in memory (the planner's stated inputs)."""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import kernels_of

RECOMPUTE = ("selective", "full", "none")
PRECISIONS = ("fp8", "bf16")
# What the training code keeps in memory: "v3" = DeepSeek-V3's published recipe (BF16 weights, FP32 gradients,
# FP32 master + BF16 moments, FP8-cached activations, the layout's recompute policy); "moerun" = moerun's own
# trainer (weights, gradients and activations in the model dtype, fp32 AdamW state, no recompute:
# runtime_memory.py, rank_memory.py), what `moerun dryrun` measures.
RECIPES = ("v3", "moerun")


@dataclass(frozen=True)
class Setup:
    """What the layout does not decide: training shape, precision, and the cluster's node size."""

    seq_len: int = 4096            # DeepSeek-V3 pre-training sequence length
    global_batch: int = 15360      # sequences per optimizer step (V3's batch schedule ends at 15360)
    precision: str = "fp8"         # GEMM precision: fp8 (V3's recipe) or bf16
    # when the run trained (YYYY-MM, or "latest"): the FP8 GEMM and attention kernels it had (hardware.py
    # KERNEL_RELEASES)
    kernels_of: str = "latest"
    capacity_factor: float = 0.0   # token dropping: each expert keeps at most this x its balanced rows (0: none)
    # what a measured machine's code does besides GEMMs, attention and communication (its ops x the measured
    # cost of one op + its element-wise bytes / the measured bandwidth, counted by a dry run:
    # runtime/calibrate.py), per micro-batch forward and backward through a stage, and at the step's end
    overhead_f_s: float = 0.0
    overhead_b_s: float = 0.0
    overhead_step_s: float = 0.0
    gpus_per_node: int = 8
    reserve_gb: float = 4.0        # CUDA context, NCCL / DeepEP buffers, allocator slack (assumption)
    load_imbalance: float = 1.0    # max/mean routed tokens per GPU (1.0: balanced, as aux-loss-free aims)
    # V3 report 4.2: "the batch size is gradually increased from 3072 to 15360 in the training of the first
    # 469B tokens, and then keeps 15360". The shape of the increase is not published: linear in tokens is
    # assumed. Used only for totals over --tokens (batch_ramp_tokens=0 turns it off).
    batch_ramp_start: int = 3072   # sequences per step at the start of training
    batch_ramp_tokens: float = 469e9
    recipe: str = "v3"             # what the training code keeps in memory (RECIPES)
    dtype_bytes: int = 2           # recipe "moerun": the model's dtype (bf16 2, fp32 4)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        kernels_of(self.kernels_of)  # checks the date
        if self.capacity_factor and self.capacity_factor < 1.0:
            raise ValueError(f"capacity_factor must be 0 (dropless) or >= 1, got {self.capacity_factor}")
        for f in ("seq_len", "global_batch", "gpus_per_node"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.batch_ramp_start < 1 or self.batch_ramp_tokens < 0:
            raise ValueError(f"batch ramp needs start >= 1 sequence and tokens >= 0, got "
                             f"{self.batch_ramp_start}, {self.batch_ramp_tokens}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 (bf16) or 4 (fp32), got {self.dtype_bytes}")
        if self.load_imbalance < 1.0:
            raise ValueError(f"load_imbalance is max/mean and must be >= 1, got {self.load_imbalance}")


    @property
    def kernels(self) -> dict[str, str]:
        return kernels_of(self.kernels_of)

    @property
    def routed_load(self) -> float:
        """max/mean routed rows per GPU: the imbalance, capped at the capacity when tokens are dropped."""
        return min(self.load_imbalance, self.capacity_factor) if self.capacity_factor else self.load_imbalance
