"""Worker for tests/test_executor.py, run under real mpirun: pipeline executor vs a single-process reference.

Every rank builds the same tiny MLA/MoE model (seeded), keeps full copies as the reference, and runs each
case on groups cut from cluster.layout for that case's (pp, ep): the schedule's step through
PipelineExecutor, then the reference micro-batch by micro-batch (loss term sum(CE)/total tokens + aux/M,
backward, accumulate). Each data-parallel copy (the pipelines side by side) gets its own micro-batches.
Per-micro-batch losses must agree within 1e-6 with the reference on the same data, the step loss too, and
every gradient of this rank's stages, after the data-parallel reduction (experts gathered over ep), within
1e-5 of the mean of the reference gradients over the dp copies' data: a reduction that does not average,
sums over the wrong group, or counts the EP all-to-all's contributions twice fails; then the forward-only
schedule's logits (inference through the pipeline) on every rank against the reference model's.

    mpirun -np 4 python tests/executor_cases.py 1f1b:2:1:4 dualpipev:2:2:4 ...   (kind:pp:ep:chunks[:lowering])

The p2p backend is the environment's (MOERUN_P2P=nccl-emulated runs it all under the NCCL emulation). A
fifth field "per-op" runs the posting the executor had before lock-step lowering (unchecked), which the
emulation must reject.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.nn.functional as F

LOSS_TOL = dict(atol=1e-6, rtol=0)
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_model(seed: int = 0):
    from runtime.model.builtin import init_weights
    from runtime.model.config import builtin_tiny_config
    from runtime.model.loading import build_model

    cfg = dataclasses.replace(builtin_tiny_config(), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=4, n_routed_experts=8, n_group=4, topk_group=2,
                              num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=0)
    model = build_model(cfg, mtp=False)
    init_weights(model, seed=seed, std=0.1)
    for m in model.modules():
        if hasattr(m, "aux_loss_coef"):
            m.aux_loss_coef = 0.01  # exercise the auxiliary-loss path as well
    return model.train()


def microbatches(vocab: int, chunks: int, batch: int = 1, seq: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(chunks):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
        labels[:, -1] = -100
        out.append((ids, labels))
    return out


def reference(model, mbs) -> list[torch.Tensor]:
    """Single process, micro-batch by micro-batch, the same loss terms as the executor."""
    total = sum(int((lab != -100).sum()) for _, lab in mbs)
    losses = []
    for ids, lab in mbs:
        logits = model(ids).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100,
                               reduction="sum") / total
        for m in model.modules():
            aux = getattr(m, "last_aux_loss", None)
            if aux is not None:
                loss = loss + aux / len(mbs)
        loss.backward()
        losses.append(loss.detach())
    return losses


def run_case(rank: int, world: int, kind: str, pp: int, ep: int, chunks: int, base, lowering: str = "lockstep",
             other=None) -> str:
    from dist_spawn import layout_groups

    from parallel.expert import Dispatcher
    from parallel.pipeline import build, forward_only
    from parallel.pipeline.executor import PipelineExecutor
    from parallel.pipeline.lower import lower
    from parallel.pipeline.stages import build_stages
    from parallel.shard import all_reduce_data_parallel_grads, gather_full
    from runtime.model.loading import shard_model

    groups = layout_groups(rank, world, ("pp", "ep", "dp", "edp"), pp=pp, ep=ep)
    pp_group, pp_ranks = groups["pp"]
    pp_rank = pp_ranks.index(rank)
    dp_group, dp_ranks = groups["dp"]
    dp, dp_index = len(dp_ranks), dp_ranks.index(rank)
    sched = build(kind, pp, chunks)
    model = copy.deepcopy(base)
    # Each data-parallel copy gets its own micro-batches; the reference runs every copy's data on its own
    # model copy, and the expected gradient is their mean (the gradient of the mean loss over dp).
    data = [microbatches(model.config.vocab_size, chunks, seed=1 + d) for d in range(dp)]
    refs = [copy.deepcopy(base) for _ in range(dp)]
    ref_losses_all = [reference(r, mbs_d) for r, mbs_d in zip(refs, data)]
    mbs, ref, ref_losses = data[dp_index], refs[dp_index], ref_losses_all[dp_index]
    if ep > 1:
        model = shard_model(model, Dispatcher(model.config.n_routed_experts, groups["ep"][0]))
    stages = build_stages(model, sched, pp_rank)
    sliced = lowering == "sliced"  # lock-step, run in slices with another collective between them
    program = lower(sched, "lockstep" if sliced else lowering)
    ex = PipelineExecutor(stages, program, pp_group=pp_group, pp_ranks=pp_ranks, pp_rank=pp_rank,
                          check=lowering != "per-op")
    if sliced:  # what the shared scheduler does to serve between the slices of a pipelined training step
        import torch.distributed as dist

        from parallel.pipeline.validate import slices

        ex.start_step(mbs)
        for cut in slices(program):
            ex.advance(cut[pp_rank])
            between = torch.ones(1)
            dist.all_reduce(between, group=other)  # a "serving step" over another group, every rank at a cut
            assert int(between) == world
        loss = ex.finish_step()
    else:
        loss = ex.run_step(mbs)
    where = f"{kind} pp={pp} ep={ep} chunks={chunks} rank={rank}" + ("" if lowering == "lockstep" else f" {lowering}")
    torch.testing.assert_close(loss, torch.stack(ref_losses).sum(), **LOSS_TOL, msg=lambda m: f"{where} loss: {m}")
    assert sorted(ex.last_losses) == list(range(chunks)), (where, sorted(ex.last_losses))
    for m, v in ex.last_losses.items():
        torch.testing.assert_close(v, ref_losses[m], **LOSS_TOL, msg=lambda msg, m=m: f"{where} mb {m} loss: {msg}")
    names = {n for s in stages.values() for n, _ in s.full_named_parameters()}
    all_reduce_data_parallel_grads(model, dp_group, groups["edp"][0])
    grads = gather_full(model, None, groups["ep"][0], grads=True) if ep > 1 else {
        n: p.grad for n, p in model.named_parameters()}
    per_copy = [dict(r.named_parameters()) for r in refs]
    checked = 0
    for n in sorted(names):
        assert grads[n] is not None, f"{where}: no gradient for {n}"
        want = torch.stack([c[n].grad for c in per_copy]).mean(0)
        torch.testing.assert_close(grads[n], want, **GRAD_TOL, msg=lambda m, n=n: f"{where} grad {n}: {m}")
        assert want.abs().max() > 0, f"{where}: reference gradient of {n} is zero (weak test)"
        if dp > 1:
            mine = per_copy[dp_index][n].grad
            assert (mine - want).abs().max() > 1e-4 * want.abs().max(), f"{where}: dp copies' data alike ({n})"
        checked += 1
    # inference through the same stages: logits of every micro-batch on every pipeline rank
    fwd = PipelineExecutor(stages, lower(forward_only(sched), "lockstep" if sliced else lowering),
                           pp_group=pp_group, pp_ranks=pp_ranks, pp_rank=pp_rank, check=lowering != "per-op")
    logits = fwd.run_forward([ids for ids, _ in mbs])
    with torch.no_grad():
        for m, (ids, _) in enumerate(mbs):
            torch.testing.assert_close(logits[m], ref.logits(ids), **GRAD_TOL, msg=lambda e, m=m: f"{where} {m}: {e}")
    return f"PASS {where} params={checked}"


def main(argv: list[str]) -> int:
    import cluster

    with cluster.init() as mesh:
        torch.manual_seed(0)
        base = tiny_model()
        other = mesh.group("control")  # a group no case posts p2p on: the "serving" between slices
        for spec in argv:
            kind, pp, ep, chunks, *lowering = spec.split(":")
            print(run_case(mesh.rank, mesh.world_size, kind, int(pp), int(ep), int(chunks), base, *lowering,
                           other=other), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
