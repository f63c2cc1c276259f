"""The shape of the code, checked by reading it (no imports run): dependencies point one way, no module
reaches into another's private names, no file grows past 500 lines.

- Layers: `launch -> runtime -> parallel -> {ops, cluster}`; ops knows nothing of distribution (no cluster,
  no torch.distributed); cluster knows nothing of models (no ops / parallel / runtime).
- Privacy: a name that starts with one underscore belongs to the module that defines it. A module that
  imports such a name from another of ours, or reads / calls `x._name` where `_name` is defined only in
  another of our modules, is reported with its line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "runtime", "parallel", "ops", "cluster")
# what each package may import of ours (the rest of the list is forbidden)
ALLOWED = {
    "launch": {"launch", "runtime", "parallel", "ops", "cluster"},
    "runtime": {"runtime", "parallel", "ops", "cluster"},
    "parallel": {"parallel", "ops", "cluster"},
    "ops": {"ops"},
    "cluster": {"cluster"},
}
MAX_LINES = 500


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_private(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def test_dependencies_point_one_way() -> None:
    bad = []
    for path in _files():
        pkg = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for mod in mods:
                top = mod.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({pkg}) imports {mod}")
                if pkg == "ops" and mod.startswith("torch.distributed"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} (ops) imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_modules_private_names() -> None:
    trees = {p: ast.parse(p.read_text()) for p in _files()}
    defined = {p: _defined_private(t) for p, t in trees.items()}
    assert sum(map(len, defined.values())) > 50  # the scan sees the code (a broken walk would pass vacuously)
    bad = []
    for path, tree in trees.items():
        elsewhere = set().union(*(names for q, names in defined.items() if q != path)) - defined[path]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if _private(a.name)]
            if isinstance(node, ast.Attribute) and node.attr in elsewhere:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}, private to another module")
    assert not bad, "\n".join(bad)


def test_no_file_is_over_500_lines() -> None:
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in _files() + sorted((ROOT / "tests").glob("*.py"))
           + sorted((ROOT / "bench").glob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, "split these (one job per module):\n" + "\n".join(big)


def test_the_checks_can_fail(tmp_path) -> None:
    """The privacy scan flags a planted violation (so a silent scan cannot pass the test above)."""
    a = ast.parse("class A:\n    def _secret(self):\n        return 1\n")
    b = ast.parse("def f(x):\n    return x._secret()\n")
    elsewhere = _defined_private(a) - _defined_private(b)
    hits = [n.attr for n in ast.walk(b) if isinstance(n, ast.Attribute) and n.attr in elsewhere]
    assert hits == ["_secret"]
