"""moerun ops layer: torch reference math (no distribution). See docs/model.md.

norm (RMSNorm), rope (rotary + YaRN), mla (expanded / absorbed latent attention), moe (router, grouped
expert SwiGLU), fp8 (128x128 block quantization). Triton twins live in ops/triton/.
"""

IGNORE_INDEX = -100  # label of a position that no loss counts (torch's cross_entropy default)
