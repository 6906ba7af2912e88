"""Grade names and the referral definition: the one table every output uses.

A model with five ordinal classes (labels ``0``..``4``) is read as the International Clinical
Diabetic Retinopathy severity scale (Wilkinson et al., Ophthalmology 2003), the grading of
APTOS 2019 and the Kaggle/EyePACS sets. Referable DR is grade >= 2 (moderate
non-proliferative DR or worse; Gulshan et al., JAMA 2016), the definition IDx-DR and EyeArt
refer on (their "more than mild DR"). A two-class model refers on its second class. Any other
model keeps its own class names and has no referral.

This module imports nothing beyond the standard library, so the torch-free ONNX path, the
report and the web page share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "DR_GRADE_NAMES",
    "REFERABLE_MIN_GRADE",
    "grade_names",
    "is_dr_grading",
    "referral_classes",
    "referral_name",
]

#: International Clinical DR severity scale, grade 0..4 (Wilkinson et al. 2003).
DR_GRADE_NAMES = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")
#: Referable DR: this grade or worse (Gulshan et al., JAMA 2016).
REFERABLE_MIN_GRADE = 2


def is_dr_grading(class_names: Sequence[Any], ordinal: bool) -> bool:
    """Whether a model grades DR: five ordinal classes.

    Parameters
    ----------
    class_names : sequence
        Class names in logit order.
    ordinal : bool
        Whether the labels are grades (``ModelMeta.ordinal``, :func:`metrics.is_ordinal`).

    Returns
    -------
    bool
    """
    return bool(ordinal) and len(class_names) == len(DR_GRADE_NAMES)


def grade_names(class_names: Sequence[Any], ordinal: bool) -> list[str]:
    """Names to show for each class: DR grade names for a DR grading model, else the classes.

    Parameters
    ----------
    class_names : sequence
        Class names in logit order (e.g. ``["0", "1", "2", "3", "4"]``).
    ordinal : bool
        Whether the labels are grades.

    Returns
    -------
    list of str
        One name per class, in logit order.
    """
    if is_dr_grading(class_names, ordinal):
        return list(DR_GRADE_NAMES)
    return [str(c) for c in class_names]


def referral_classes(
    class_names: Sequence[Any], ordinal: bool, positive_class: str | None = None
) -> tuple[int, ...] | None:
    """Class indices that count as "refer": grades >= 2 for DR, the positive class for two.

    Parameters
    ----------
    class_names : sequence
        Class names in logit order.
    ordinal : bool
        Whether the labels are grades.
    positive_class : str, optional
        The positive class of a two-class model (``ModelMeta.positive_class``); default the
        second class.

    Returns
    -------
    tuple of int or None
        ``None`` when the model has no referral (three or more classes that are not DR grades).
    """
    if is_dr_grading(class_names, ordinal):
        return tuple(range(REFERABLE_MIN_GRADE, len(class_names)))
    if len(class_names) == 2:
        names = [str(c) for c in class_names]
        return (names.index(str(positive_class)) if positive_class in names else 1,)
    return None


def referral_name(
    class_names: Sequence[Any], ordinal: bool, positive_class: str | None = None
) -> str | None:
    """What a positive referral means, in words (``None`` when there is no referral)."""
    if is_dr_grading(class_names, ordinal):
        return f"referable DR (grade >= {REFERABLE_MIN_GRADE})"
    positive = referral_classes(class_names, ordinal, positive_class)
    if positive is not None:
        return f"positive class {class_names[positive[0]]!s}"
    return None
