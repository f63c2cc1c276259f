"""Host synchronisations per MoE dispatch on the training path, counted on 2 spawned ranks at ep=2.

A dispatch must learn how many rows each rank sends and receives before it can size its buffers: one host
read of the exchanged counts (`.tolist()`), the only synchronisation a dispatch may make. Everything else on
a training micro-step's forward and backward (routing, the gate's expert loads and balance loss, the
trainer's hooks, the grouped expert GEMM, combine, the backward all-to-alls) must stay on the device. The
Trainer runs its micro-batches' forward and backward (no optimizer step: that needs the global norm) with
the aux loss and the bias update on, under a counter of every call that would make a GPU wait
(tests/host_syncs.py); the count and where each sync comes from are printed. (Before this test the same
step made about 10 per dispatch plus one per gate: range checks of the ids, bincount and boolean masks for
the expert loads, loads and losses read per gate and per micro-batch, nonzero for the routes.)
"""

from __future__ import annotations

import os

import pytest
from dist_spawn import run_spawn
from host_syncs import HostSyncs
from test_scheduler_dist import _Mesh
from train_helpers import tiny_config


def _count(rank: int, world: int, out_dir: str) -> None:
    from runtime.train.trainer import Trainer

    cfg = tiny_config(os.path.join(out_dir, f"r{rank}"), aux_loss_coef=1e-3, bias_update_rate=1e-3)
    trainer = Trainer(cfg, _Mesh(rank, world, ep=2))
    moe_layers = [layer for layer in trainer.model.model.layers if layer.is_moe]
    dispatcher = moe_layers[0].dispatcher
    assert all(layer.dispatcher is dispatcher for layer in moe_layers) and dispatcher.group is not None
    calls = []
    real = dispatcher.dispatch_async

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dispatcher.dispatch_async = counted
    inputs, labels = trainer.batch(0)
    chunks = trainer.microbatch_slices(inputs.shape[0])
    trainer.model.train()
    trainer.forward_backward(inputs, labels, chunks)  # warm-up: first-call effects are not the steady state
    calls.clear()
    with HostSyncs() as syncs:
        trainer.forward_backward(inputs, labels, chunks)
    assert len(calls) == len(moe_layers) * len(chunks), (len(calls), len(moe_layers), len(chunks))
    # the step's loss parts are read on the host once, at its end (for the metrics line)
    readout = sum(n for site, n in syncs.sites.items() if site.startswith("runtime/train/trainer.py"))
    per_dispatch = (syncs.total - readout) / len(calls)
    if rank == 0:
        print(f"\nhost syncs on the training path at ep=2: {syncs.total - readout} in {len(calls)} dispatches "
              f"({len(moe_layers)} MoE layers x {len(chunks)} micro-batches): {per_dispatch:.2f} per dispatch, "
              f"and {readout} to read the step's loss")
        for site, n in syncs.sites.most_common():
            print(f"  {n:4d}  {site}")
    assert per_dispatch <= 1.0 and readout <= 1, syncs.sites.most_common()
    others = [site for site in syncs.sites if not site.startswith(("parallel/expert.py", "runtime/train/trainer.py"))]
    assert not others, others  # nothing but the dispatch's count exchange and the step's loss readout


@pytest.mark.timeout(180)
def test_host_syncs_per_moe_dispatch_on_the_training_path(tmp_path, capfd):
    run_spawn(_count, 2, str(tmp_path))
