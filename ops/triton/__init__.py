"""Triton kernels, one module per kernel, each the twin of a torch reference op in `ops/`.

Nothing here is imported by `import ops`: `ops.kernels` imports a kernel module only when the Triton path is
selected (CUDA, or `MOERUN_KERNELS=triton` with `TRITON_INTERPRET=1` on CPU). Each kernel is tested against
its twin under the interpreter (tests/test_triton_*.py); see docs/kernels.md.
"""
