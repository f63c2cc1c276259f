"""`moerun schedule`: JSON contract, table, errors, trace and PNG files, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from parallel.pipeline import build
from parallel.pipeline.simulate import Costs, bubble_formula, simulate

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    rc = main(["schedule", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("kind,pp,chunks", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                            ("dualpipev", 4, 10), ("gpipe", 2, 3)])
def test_json_contract(capsys, kind, pp, chunks):
    rc, out, _ = _run(capsys, "--kind", kind, "--pp", str(pp), "--chunks", str(chunks),
                      "--cost", "f=1,b=2,w=1,fb=2.5,comm=0.1", "--json")
    assert rc == 0
    d = json.loads(out)
    assert list(d) == ["kind", "pp", "chunks", "costs", "makespan", "ranks", "bubble_formula"]
    assert (d["kind"], d["pp"], d["chunks"]) == (kind, pp, chunks)
    assert {k: d["costs"][k] for k in ("f", "b", "w", "fb", "comm")} == {"f": 1, "b": 2, "w": 1, "fb": 2.5,
                                                                         "comm": 0.1}
    assert [list(r) for r in d["ranks"]] == [["rank", "busy", "bubble", "peak_activations"]] * pp
    costs = Costs(f=1, b=2, w=1, fb=2.5, comm=0.1)
    res = simulate(build(kind, pp, chunks), costs)
    assert d["makespan"] == pytest.approx(res.makespan)
    assert [r["bubble"] for r in d["ranks"]] == pytest.approx([r.bubble for r in res.ranks])
    assert d["bubble_formula"] == bubble_formula(kind, pp, costs)
    assert (d["bubble_formula"] is None) == (kind == "gpipe")


def test_table(capsys):
    rc, out, _ = _run(capsys, "--kind", "1f1b", "--pp", "4", "--chunks", "8")
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split() == ["rank", "busy", "bubble", "bubble%", "peak", "act"]
    assert [ln.split()[0] for ln in lines[2:6]] == ["0", "1", "2", "3"]
    assert "makespan 33; worst bubble 9; bubble formula (DualPipe README) 9" in out  # default f=1, b=2: (4-1)(1+2)


@pytest.mark.parametrize("argv,msg", [
    (["--kind", "1f1b", "--pp", "4", "--chunks", "8", "--cost", "f=1,x=2"],
     "unknown --cost key 'x'; valid keys: f, b, w, fb, comm, a2a_f, a2a_b"),
    (["--kind", "1f1b", "--pp", "4", "--chunks", "8", "--cost", "f=fast"], "--cost f='fast' is not a number"),
    (["--kind", "1f1b", "--pp", "4", "--chunks", "8", "--cost", "f"], "is not key=value"),
    (["--kind", "1f1b", "--pp", "4", "--chunks", "8", "--cost", "b=1,w=2"], "must not exceed b"),
    (["--kind", "dualpipe", "--pp", "3", "--chunks", "12"], "even number of pipeline ranks"),
    (["--kind", "dualpipev", "--pp", "4", "--chunks", "6"], "chunks >= 2*pp = 8"),
])
def test_errors_name_the_problem(capsys, argv, msg):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert msg in err


def test_unknown_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["schedule", "--kind", "looped", "--pp", "2", "--chunks", "2"])
    assert e.value.code == 2
    assert "invalid choice: 'looped'" in capsys.readouterr().err


def test_trace_and_png_files(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    rc, out, _ = _run(capsys, "--kind", "dualpipev", "--pp", "4", "--chunks", "10", "--trace", str(trace),
                      "--png", str(png))
    assert rc == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == sum(len(build("dualpipev", 4, 10).compute_actions(r))
                                                      for r in range(4))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_unwritable_output_is_a_clear_error(capsys, tmp_path):
    rc, _, err = _run(capsys, "--kind", "1f1b", "--pp", "2", "--chunks", "2", "--trace",
                      str(tmp_path / "no" / "such" / "dir" / "t.json"))
    assert rc == 2 and "cannot write" in err and "t.json" in err


def test_command_does_not_import_torch():
    code = ("import sys; from launch.cli import main; "
            "rc = main(['schedule', '--kind', 'dualpipe', '--pp', '4', '--chunks', '8', '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "dualpipe"
