"""Shard-only loading of an FP8 block-quantised checkpoint (bench/shard_loading.py at CI size): 4 ranks
(pp=2 x ep=2) each read only their share; each rank's peak RSS during the load stays within the bytes it
materialised plus its share of the checkpoint plus a fixed overhead (the script states it); the single
process, holding everything, exceeds every rank's bound; logits of a short prompt equal the single
process's within 1e-4. The multi-GB variant with DeepSeek-V3's real shapes is the same script with
`--geometry v3`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launchers import ROOT, base_env


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_pp2_ep2_ranks_read_only_their_share(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "shard_loading.py"), "--geometry", "small",
                          "--dir", str(tmp_path), "--json"], env=base_env(), capture_output=True, text=True,
                         timeout=280, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"rows"')]
    assert out.returncode in (0, 1) and lines, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(lines[-1])
    rows = doc["rows"]
    for r in rows:  # printed for the log: share, materialised, peak increase, bound
        print({k: r[k] for k in ("rank", "share", "params", "peak", "bound", "err")})
    single, ranks = rows[0], rows[1:]
    assert single["rank"] == "single" and len(ranks) == 4
    assert doc["ok"], rows
    for r in ranks:
        assert r["peak"] <= r["bound"]
        assert r["params"] < 0.6 * single["params"] and r["share"] < 0.6 * single["share"]
        assert single["peak"] > r["bound"]  # loading the whole model would break a rank's bound
    errs = [r["err"] for r in ranks if r["err"] is not None]
    assert len(errs) == 2 and max(errs) <= 1e-4  # the two last-stage ranks compared their logits
