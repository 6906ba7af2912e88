"""Issue 20 item 4: the names of operating points, TTA modes, optimisers and schedules (and of
the patient rules) are written once, in their home; no other module spells out a list of them
(they import it instead)."""

from __future__ import annotations

import ast
from pathlib import Path

from medtune import config
from medtune.evaluation import patients

SRC = Path(__file__).resolve().parents[2] / "src" / "medtune"
#: Each group of names, and the one module that lists them.
HOMES = {
    "operating points": (set(config.OPERATING_POINTS), "config.py"),
    "TTA modes": (set(config.TTA_MODES), "config.py"),
    "optimisers": (set(config.OPTIMIZERS), "config.py"),
    "schedules": (set(config.SCHEDULES), "config.py"),
    "patient rules": (set(patients.PATIENT_RULES), "evaluation/patients.py"),
}


def _literal_lists(tree: ast.AST):
    """Every list, tuple or set literal and the keys of every dict literal, as string sets."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        words = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        yield node.lineno, words


def test_no_module_but_the_home_lists_these_names() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        for line, words in _literal_lists(ast.parse(path.read_text(encoding="utf-8"))):
            for group, (names, home) in HOMES.items():
                if where != home and len(words & names) >= 2:
                    found.append(f"{where}:{line} lists {group} {sorted(words & names)}")
    assert not found, "import them from their home instead:\n" + "\n".join(found)


def test_the_scan_sees_a_literal_list() -> None:
    """The check above would catch the literals this issue removed from cli/commands.py."""
    tree = ast.parse('p.add_argument("--x", choices=["sens90", "sens97.5", "youden"])')
    assert any(len(words & set(config.OPERATING_POINTS)) >= 2 for _, words in _literal_lists(tree))


#: Parameters named ``size`` that are not the model's input side, and what they are instead.
OTHER_SIZES = {
    "data/synthetic.py": "the side of a generated synthetic photograph",
    "data/fundus.py:_square_resize": "the side of any square resize",
}


def _size_parameters(tree: ast.AST, where: str):
    """``(place, line)`` of every function parameter named ``size`` outside :data:`OTHER_SIZES`."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            place = f"{where}:{node.name}"
            if any(a.arg == "size" for a in args) and not (
                where in OTHER_SIZES or place in OTHER_SIZES
            ):
                yield place, node.lineno


def test_the_model_input_side_is_called_image_size() -> None:
    found = [
        hit
        for path in sorted(SRC.rglob("*.py"))
        for hit in _size_parameters(ast.parse(path.read_text()), path.relative_to(SRC).as_posix())
    ]
    assert not found, f"call the model's input side image_size (docs/architecture.md): {found}"
    sample = ast.parse("def prepare(img, size: int):\n    return img\n")
    assert list(_size_parameters(sample, "data/x.py")) == [("data/x.py:prepare", 1)]
