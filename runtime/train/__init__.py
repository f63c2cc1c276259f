"""Training engine: data order, AdamW + ZeRO-1, checkpoints, the step-level Trainer (see docs/training.md).

Submodules import torch; this package file does not, so `import runtime.train` stays cheap."""
