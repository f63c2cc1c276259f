"""The Python API contract under real mpirun: `runtime.load_model(path, mesh=mesh)` reads only this rank's
slices, and `model.logits` gives the full-vocab logits of the single-process model on every rank."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.hf_models import make_hf_model, random_ids
from tests.launchers import mpirun

SCRIPT = r"""
import sys, torch, cluster, runtime
from safetensors.torch import load_file
path, ref_file = sys.argv[1], sys.argv[2]
ref = load_file(ref_file)
for tp, ep in ((2, 1), (1, 2), (1, 4), (2, 2)):
    with cluster.init(tp=tp, ep=ep) as mesh:
        model = runtime.load_model(path, mesh=mesh)
        with torch.no_grad():
            logits = model.logits(ref["ids"])
        err = (logits - ref["logits"]).abs().max().item()
        n_experts = model.model.layers[1].mlp.experts.gate_proj.shape[0]
        print(f"layout tp={tp} ep={ep} rank={mesh.rank} err={err:.3e} local_experts={n_experts}", flush=True)
        assert logits.shape == ref["logits"].shape and err < 1e-5, err
"""


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_load_model_with_mesh_matches_single_process(tmp_path):
    import runtime

    path, _ = make_hf_model(tmp_path / "ckpt", "deepseek_v3", seed=3)
    ids = random_ids(2, 9, 96, seed=5)
    with torch.no_grad():
        ref = runtime.load_model(str(path)).logits(ids)
    save_file({"ids": ids, "logits": ref.contiguous()}, str(tmp_path / "ref.safetensors"))
    (tmp_path / "check.py").write_text(SCRIPT)
    out = mpirun(4, [], python_args=[str(tmp_path / "check.py"), str(path), str(tmp_path / "ref.safetensors")],
                 timeout=230)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("layout")]
    assert len(lines) == 16, out.stdout
    # each rank holds 8 / ep experts
    for line in lines:
        ep = int(line.split("ep=")[1].split()[0])
        assert f"local_experts={8 // ep}" in line, line
