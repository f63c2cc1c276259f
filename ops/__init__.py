"""moerun ops layer: torch reference math (no distribution). See docs/model.md.

norm (RMSNorm), rope (rotary + YaRN), mla (expanded / absorbed latent attention), moe (router, grouped
expert SwiGLU), fp8 (128x128 block quantization). Triton twins live in ops/triton/.
"""
