"""The benchmark scripts import what exists: each name one imports from the screener package or from a
sibling script is defined there (read as text, so no benchmark's torch work runs)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(script: Path):
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        sibling = BENCHMARKS / f"{node.module}.py"
        if sibling.is_file():
            missing = {a.name for a in node.names} - _top_level_names(sibling)
            assert not missing, f"{script.name}:{node.lineno} imports {sorted(missing)} from {sibling.name}"
        elif node.module.split(".")[0] == "screener":
            module = importlib.import_module(node.module)
            for a in node.names:
                assert hasattr(module, a.name) or importlib.util.find_spec(f"{node.module}.{a.name}"), (
                    f"{script.name}:{node.lineno}: {node.module} has no {a.name}"
                )
