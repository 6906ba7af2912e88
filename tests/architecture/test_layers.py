"""The package's layers, as ``docs/architecture.md`` draws them, are the ones its imports follow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def documented_layers() -> dict[str, int]:
    """``{"medtune.data": 2, ...}`` from the table between the layers markers of the doc."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- layers:begin -->")[1].split("<!-- layers:end -->")[0]
    layers: dict[str, int] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`(medtune[\w.]*)`", cells[1]):
                layers[name] = int(cells[0])
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "medtune").rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str:
    """The module an import refers to (``from medtune.data import fundus`` -> the submodule)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every medtune module ``path`` imports, at any depth (functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {resolve(n, known) for n in names if n.split(".")[0] == "medtune"}
    return found


def layer_of(module: str, layers: dict[str, int]) -> int:
    best = max((n for n in layers if module == n or module.startswith(n + ".")), key=len)
    return layers[best]


def test_the_doc_names_every_package_and_top_level_module():
    layers = documented_layers()
    top = {m.split(".")[1] for m in modules() if m.count(".") >= 1}
    assert {f"medtune.{t}" for t in top} <= set(layers), "a package is missing from the table"
    assert "medtune" in layers


def test_no_module_imports_from_a_layer_above_it():
    layers, known = documented_layers(), modules()
    upward = []
    for name, path in known.items():
        here = layer_of(name, layers)
        for target in imports_of(path, known):
            if layer_of(target, layers) > here:
                upward.append(f"{name} (layer {here}) imports {target}")
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle():
    known = modules()
    graph = {
        name: {t for t in imports_of(path, known) if t != name} for name, path in known.items()
    }
    # a package's __init__ is not part of a circle through its own submodules' lazy names
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk finds imports inside functions (the kind that hid the old circles)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from medtune.workflows.train import train\n")
    known = {"medtune.workflows.train": Path(), "medtune.workflows": Path()}
    assert imports_of(source, known) == {"medtune.workflows.train"}


def test_every_import_names_a_module_that_exists():
    """An import of a moved or deleted module (inside a function it fails only when run)."""
    known = modules()
    missing = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            missing += [
                f"{name}: {t}" for t in targets if t.startswith("medtune") and t not in known
            ]
    assert not missing, "\n".join(missing)
