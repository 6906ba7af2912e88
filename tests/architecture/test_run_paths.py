"""Issue 20 item 5: every file of a run gets its path from ``runs.folder.RunFolder``; no other
module joins a run file's name (a ``RunFolder`` constant or its spelling) to a folder."""

from __future__ import annotations

import ast
from pathlib import Path

from medtune.runs import RunFolder

SRC = Path(__file__).resolve().parents[2] / "src" / "medtune"
HOME = "runs/folder.py"
#: The names of a run's files and folders (``RunFolder.CONFIG``, ``RunFolder.METRICS``, ...).
NAMES = {v for k, v in vars(RunFolder).items() if k.isupper() and isinstance(v, str)}
#: Modules that join one of these names to a folder that is not a run (what it is instead).
NOT_A_RUN = {
    "models/backbones.py": "torch hub's checkpoints folder",
    "deploy/engine.py": "a private temporary folder for the graph being built",
    "deploy/onnx_predictor.py": "an export folder (model.onnx beside its model.json)",
    "workflows/serve/card.py": "an export folder's model.onnx",
}


def _joins(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``folder / NAME`` with NAME a run file's name or constant."""
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
            continue
        right = node.right
        if isinstance(right, ast.Constant) and right.value in NAMES:
            out.append((node.lineno, str(right.value)))
        elif (
            isinstance(right, ast.Attribute)
            and isinstance(right.value, ast.Name)
            and right.value.id == "RunFolder"
        ):
            out.append((node.lineno, f"RunFolder.{right.attr}"))
    return out


def test_no_module_but_the_run_folder_builds_run_paths() -> None:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if where == HOME or where in NOT_A_RUN:
            continue
        hits = _joins(ast.parse(path.read_text(encoding="utf-8")))
        if hits:
            found[where] = hits
    assert not found, f"take these paths from RunFolder (docs/architecture.md): {found}"


def test_the_scan_sees_a_join() -> None:
    tree = ast.parse('a = run / "metrics.json"\nb = run / RunFolder.EVAL\nc = run / "x.txt"\n')
    assert _joins(tree) == [(1, "metrics.json"), (2, "RunFolder.EVAL")]
