"""Worker for tests/test_p2p_emulation.py, run under real mpirun: lowered p2p programs on real ranks.

Each case `kind:pp:chunks:lowering` runs the POST / WAIT skeleton of `lower(build(kind, pp, chunks),
lowering)` on one pipeline of pp ranks (compute actions do nothing): every message carries its identity
(what, stage, mb, sender) and the receiver checks it after its WAIT. All cases run at once, each on its own
process group (a deadlocked case breaks only its own group), each in its own thread, so the run takes
about one MOERUN_P2P_TIMEOUT however many cases deadlock. Rank 0 prints one line per case:

    CASE 1f1b:2:5:per-op ok|deadlock|error <first message>

    MOERUN_P2P=nccl-emulated MOERUN_P2P_TIMEOUT=8 mpirun -np 8 python tests/p2p_cases.py 1f1b:2:5:lockstep ...
"""

from __future__ import annotations

import sys
import threading

import torch

VERDICTS = ("ok", "deadlock", "error")
_WHAT = {"act": 1.0, "grad": 2.0}


def payload(op, sender: int) -> torch.Tensor:
    return torch.tensor([_WHAT[op.what], op.stage, op.mb, sender], dtype=torch.float32, device="cpu")


def run_program(actions, pp_ranks: list[int], pp_rank: int, group) -> None:
    """Post and wait exactly as the executor does, with identity payloads instead of activations."""
    from cluster import p2p
    from parallel.pipeline.schedule import POST, SEND, WAIT

    chan = p2p.channel(group)
    inflight: dict = {}
    for a in actions:
        if a.kind == POST:
            ops = [p2p.Op("send" if op.kind == SEND else "recv",
                          payload(op, pp_rank) if op.kind == SEND else torch.empty(4, device="cpu"), pp_ranks[op.peer],
                          f"{op.what} s{op.stage} mb{op.mb}") for op in a.ops]
            for op, work, o in zip(a.ops, chan.post(ops), ops, strict=True):
                inflight[op] = (work, o.tensor)
        elif a.kind == WAIT:
            for op in a.ops:
                work, t = inflight.pop(op)
                work.wait()
                if op.kind != SEND and not torch.equal(t, payload(op, op.peer)):
                    raise AssertionError(f"pp rank {pp_rank}: {op} received {t.tolist()}")
    if inflight:
        raise AssertionError(f"pp rank {pp_rank}: never waited for {list(inflight)[:3]}")


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    import cluster
    from cluster.p2p import P2PError, P2PTimeout
    from parallel.pipeline import build
    from parallel.pipeline.lower import lower

    with cluster.init() as mesh:
        world = mesh.world_size
        cases, used = [], {}
        for spec in argv:
            kind, pp, chunks, lowering = spec.split(":")
            pp, chunks = int(pp), int(chunks)
            pipes = world // pp
            slot = used.get(pp, 0)
            used[pp] = slot + 1
            first = (slot % pipes) * pp  # spread the cases of one pp over the disjoint pipelines
            members = list(range(first, first + pp))
            group = dist.new_group(members)  # every rank creates every group, in the same order
            cases.append((spec, lower(build(kind, pp, chunks), lowering, check=False), members, group))
        verdict = torch.zeros(len(cases), dtype=torch.int64, device=mesh.device)
        notes: dict[int, str] = {}

        def run(i: int) -> None:
            spec, sched, members, group = cases[i]
            try:
                run_program(sched.ranks[members.index(mesh.rank)], members, members.index(mesh.rank), group)
            except P2PTimeout as e:
                verdict[i], notes[i] = 1, str(e)
            except (P2PError, AssertionError) as e:
                verdict[i], notes[i] = 2, str(e)

        threads = [threading.Thread(target=run, args=(i,)) for i, c in enumerate(cases) if mesh.rank in c[2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # a case is a deadlock if any of its ranks timed out; an error elsewhere is what a timeout leaves
        timed_out = (verdict == 1).to(torch.int64)
        failed = (verdict == 2).to(torch.int64)
        dist.all_reduce(timed_out)
        dist.all_reduce(failed)
        for i, (spec, *_rest) in enumerate(cases):
            v = "deadlock" if timed_out[i] else "error" if failed[i] else "ok"
            if mesh.rank in cases[i][2] and i in notes:
                print(f"NOTE {spec} rank {mesh.rank}: {notes[i][:600]}", flush=True)
            if mesh.rank == 0:
                print(f"CASE {spec} {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
