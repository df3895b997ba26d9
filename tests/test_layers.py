"""Imports go one way (docs/architecture.md): sall <- tracking <- analysis <- sweeps. A module may import
its own package and those below it, never one above, so no two packages import each other; the cluster
scripts import none of them. Function-level imports count too. bench/ and tests/ may import anything."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sall": 0, "tracking": 1, "analysis": 2, "sweeps": 3}  # bottom to top
OWN = {**LAYERS, "cluster": -1}  # the cluster scripts sit beside the layers: they import none of them


def first_party_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [(a.name, f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [(node.module, f"from {node.module} import {', '.join(a.name for a in node.names)}")]
        else:
            continue  # relative imports stay in their own package
        for name, text in found:
            if name.split(".")[0] in LAYERS:
                yield node.lineno, name.split(".")[0], text


def test_no_package_imports_one_above_it():
    violations, seen = [], 0
    for package, own in OWN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            seen += 1
            for line, top, text in first_party_imports(ast.parse(path.read_text(), str(path))):
                if LAYERS[top] > own:
                    violations.append(f"{path.relative_to(ROOT)}:{line}: {text} ({top} is not below {package})")
    assert seen > 40, f"found only {seen} modules under {ROOT}"
    assert not violations, "imports that run up a layer:\n" + "\n".join(violations)
