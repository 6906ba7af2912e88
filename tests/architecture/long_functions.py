"""List the functions of ``src/medtune`` longer than a limit, in lines of code.

A line of code is a line of the function's source that holds code: blank lines, comment lines and
the lines of docstrings (of the function and of functions or classes inside it) do not count. A
nested function counts in its own right and inside its parent, as it does when the parent is read.
``ast`` and ``tokenize`` (standard library) do the reading; no linter in the project counts lines
this way (ruff's ``PLR0915`` counts statements, not lines).

Run as ``python tests/architecture/long_functions.py [LIMIT] [PATH ...]`` (default 80, ``src``);
:func:`long_functions` is the helper a test can call.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 80


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The line numbers taken by docstrings of modules, classes and functions in ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    return lines


def _code_lines(source: str) -> set[int]:
    """The line numbers holding a token other than a comment, a newline or indentation."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip and tok.type != tokenize.ENDMARKER:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, lines of code)`` of every function in the file ``path``."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    code = _code_lines(source) - _docstring_lines(tree)
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    span = range(first, (child.end_lineno or child.lineno) + 1)
                    found.append((name, child.lineno, len(code.intersection(span))))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def long_functions(paths: list[Path], limit: int = LIMIT) -> list[tuple[Path, str, int, int]]:
    """``(file, function, first line, lines of code)`` for each function over ``limit`` lines."""
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    return [(f, name, line, n) for f in files for name, line, n in function_lengths(f) if n > limit]


def main(argv: list[str]) -> int:
    limit = int(argv[0]) if argv else LIMIT
    paths = [Path(a) for a in argv[1:]] or [ROOT / "src"]
    rows = long_functions(paths, limit)
    for f, name, line, n in sorted(rows, key=lambda r: -r[3]):
        print(f"{n:4d}  {f}:{line}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
