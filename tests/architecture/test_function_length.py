"""Issue 20: no function over 80 lines of code (docstrings, comments, blank lines not counted)."""

from __future__ import annotations

from pathlib import Path

from long_functions import LIMIT, function_lengths, long_functions

SRC = Path(__file__).resolve().parents[2] / "src" / "medtune"


def test_no_function_is_longer_than_the_limit() -> None:
    found = {
        f"{path.relative_to(SRC).as_posix()}:{name}": n
        for path, name, _, n in long_functions([SRC], LIMIT)
    }
    assert not found, f"split these functions (lines of code > {LIMIT}): {found}"


def test_the_count_skips_docstrings_comments_and_blank_lines(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(5))
    source = (
        "def f(\n    a,\n):\n"
        '    """Doc.\n\n    More doc.\n    """\n'
        "    # a comment\n\n" + body + "\n    def g():\n"
        '        """Inner doc."""\n'
        "        return (\n            1\n        )\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    lengths = {name: n for name, _, n in function_lengths(path)}
    assert lengths == {"f": 3 + 5 + 4, "f.g": 4}
