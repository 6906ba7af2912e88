"""DR grades written as words in a label column or as class-folder names.

Export scripts and public sets write the International Clinical DR severity grades (Wilkinson
et al., Ophthalmology 2003) as numbers (``0``..``4``, APTOS, EyePACS) or as words (``No_DR``,
``Mild``, ``Moderate``, ``Severe``, ``Proliferate_DR`` in the Kaggle "Gaussian filtered" set;
``Moderate NPDR`` in reports). Read as plain class names, a word among numbers becomes a class
of its own (``['0', '2', 'Moderate']``: three unordered classes, no referral) and a set named
by words becomes five unordered classes sorted alphabetically. :func:`resolve_grade_words` reads
them as the grades they are, says so in one warning, and refuses a word it cannot read among
numeric grades. No library spells these variants out, hence the table below.

Standard library only (imported by :mod:`medtune.data.classes` and :mod:`medtune.data.sources`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from medtune.errors import MedtuneError

__all__ = ["DR_GRADE_WORDS", "dr_grade_of", "resolve_grade_words"]

log = logging.getLogger(__name__)

#: Spellings of each DR grade, compared after :func:`_fold` (lowercase, ``_``/``-`` as spaces).
DR_GRADE_WORDS: dict[int, tuple[str, ...]] = {
    0: ("no dr", "nodr", "no diabetic retinopathy", "no apparent retinopathy", "no retinopathy"),
    1: ("mild", "mild dr", "mild npdr", "mild non proliferative dr"),
    2: ("moderate", "moderate dr", "moderate npdr", "moderate non proliferative dr"),
    3: ("severe", "severe dr", "severe npdr", "severe non proliferative dr"),
    4: ("proliferative", "proliferative dr", "proliferate dr", "proliferate", "pdr"),
}
_LOOKUP = {word: grade for grade, words in DR_GRADE_WORDS.items() for word in words}
#: Words that only DR grading uses: a set named by words is read as DR grades only when one of
#: its names holds one of these (``mild``/``moderate``/``severe`` alone grade other diseases too).
_DR_ONLY = re.compile(r"\b(dr|npdr|pdr|retinopathy|proliferat\w*)\b")
_INTEGER = re.compile(r"[+-]?\d+")
_HELP = "No DR=0, Mild=1, Moderate=2, Severe=3, Proliferative=4"


def _fold(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", text).lower().split())


def dr_grade_of(label: str) -> int | None:
    """The DR grade (0-4) a label names in words, e.g. ``"Proliferate_DR"`` -> 4.

    Parameters
    ----------
    label : str
        A label as written (case, ``_``, ``-`` and extra spaces do not matter).

    Returns
    -------
    int or None
        The grade, or ``None`` when the label is not one of :data:`DR_GRADE_WORDS`.
    """
    return _LOOKUP.get(_fold(label))


def resolve_grade_words(
    raw: Sequence[str],
    where: Path,
    row_of: Callable[[int], str],
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Labels with DR grade words replaced by their grade numbers where the set is DR grades.

    Words are read as grades (with one warning giving the mapping) when the other labels (or
    the given ``classes``) are integer grades within 0-4, or when every label is a grade word
    and at least one is DR-specific (``No DR``, ``Proliferative DR``, ``NPDR``, ...).

    Parameters
    ----------
    raw : sequence of str
        Canonical label texts (integers already as ``"2"``), one per image.
    where : Path
        The CSV or folder the labels came from (named in messages).
    row_of : callable
        ``row_of(i)`` names image ``i`` in a message, e.g. ``"row 7"``.
    classes : sequence of str, optional
        The expected classes (a model's), when given.

    Returns
    -------
    list of str
        ``raw`` with grade words replaced by ``"0"``..``"4"``, or ``raw`` unchanged.

    Raises
    ------
    MedtuneError
        When integer grades are mixed with a word that is not a DR grade name, or with grade
        words while the integers are not grades 0-4.
    """
    numbers = [int(c) for c in (classes if classes is not None else raw) if _INTEGER.fullmatch(c)]
    words = sorted({v for v in raw if not _INTEGER.fullmatch(v)})
    if not words:
        return list(raw)
    if not numbers:
        all_grades = classes is None and all(dr_grade_of(w) is not None for w in words)
        if not (all_grades and any(_DR_ONLY.search(_fold(w)) for w in words)):
            return list(raw)  # class names that are words: kept as they are
    elif classes is not None and any(not _INTEGER.fullmatch(c) for c in classes):
        return list(raw)  # a model with word classes: checked against them by the caller
    else:
        _refuse_mixed(raw, words, numbers, where, row_of)
    mapping = {w: str(dr_grade_of(w)) for w in words}
    said = ", ".join(f"'{w}' -> {g}" for w, g in mapping.items())
    log.warning("%s: labels read as DR grades (%s): %s", where, _HELP, said)
    return [mapping.get(v, v) for v in raw]


def _refuse_mixed(
    raw: Sequence[str],
    words: list[str],
    numbers: list[int],
    where: Path,
    row_of: Callable[[int], str],
) -> None:
    """Refuse a word among integer labels unless every word is a DR grade and every integer is
    a grade 0-4."""
    shown = ", ".join(str(n) for n in sorted(set(numbers)))
    unknown = [w for w in words if dr_grade_of(w) is None]
    if unknown:
        i = list(raw).index(unknown[0])
        raise MedtuneError(
            f"{where}: {row_of(i)}: label '{unknown[0]}' is a word among integer labels "
            f"({shown}); write the class as a number like the others (DR grade names are "
            f"read as {_HELP})"
        )
    if not all(0 <= n <= 4 for n in numbers):
        i = list(raw).index(words[0])
        raise MedtuneError(
            f"{where}: {row_of(i)}: label '{words[0]}' is a DR grade name but the other labels "
            f"({shown}) are not DR grades 0-4; write every label as a number of one scale"
        )
