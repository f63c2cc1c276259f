"""moerun runtime layer."""


def load_model(path, mesh=None, dtype=None, **kwargs):
    """Load an HF model directory or "builtin:tiny" (see runtime.model.loading.load_model). Imports torch lazily,
    so `import runtime` stays torch-free for the launcher."""
    import torch

    from runtime.model.loading import load_model as _load

    return _load(path, mesh=mesh, dtype=dtype or torch.float32, **kwargs)
