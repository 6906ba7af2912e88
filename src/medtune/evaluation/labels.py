"""What a model's classes mean: :class:`LabelSpace`, the one description of the label space.

Design: a model's outputs are read through ONE value, ``LabelSpace`` (class names in logit order,
graded or not, the positive class of a two-class task). Every question about the labels is a
method of it, answered once here: the display names (:meth:`LabelSpace.grade_names`), which
classes are referable (:meth:`LabelSpace.referral_classes`) and the binary task behind the
headline sensitivity, specificity and AUC (:meth:`LabelSpace.binary_task`). Metrics, referral,
the report, ``predict`` and the web page (through ``predict``) take a ``LabelSpace`` instead of
loose ``class_names`` / ``ordinal`` / ``positive_class`` values, so they cannot disagree:

* graded labels: more than two classes named by consecutive integers (:func:`is_ordinal`),
  unless told otherwise;
* five ordinal classes are read as the International Clinical Diabetic Retinopathy severity
  scale (Wilkinson et al., Ophthalmology 2003), the grading of APTOS 2019 and the Kaggle/EyePACS
  sets, shown with its grade names (:data:`DR_GRADE_NAMES`); referable DR is grade >= 2
  (moderate non-proliferative DR or worse; Gulshan et al., JAMA 2016), the definition IDx-DR
  and EyeArt refer on (their "more than mild DR"). Any other model keeps its class names;
  three or more classes that are not DR grades have no referral;
* a two-class task's positive class, when none is given, is the class NOT named like a negative
  finding (:func:`default_positive_class`), else the second class. ``["DR", "No_DR"]`` refers on
  ``DR`` everywhere (metrics, referral, predict, export).

This module imports numpy and the standard library only (the torch-free ONNX path uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtune.errors import MedtuneError

__all__ = [
    "DR_GRADE_NAMES",
    "NEGATIVE_NAMES",
    "REFERABLE_MIN_GRADE",
    "BinaryTask",
    "LabelSpace",
    "default_positive_class",
    "is_ordinal",
]

#: International Clinical DR severity scale, grade 0..4 (Wilkinson et al. 2003).
DR_GRADE_NAMES = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")
#: Referable DR: this grade or worse (Gulshan et al., JAMA 2016).
REFERABLE_MIN_GRADE = 2

#: Class names that mean "no finding" (compared lowercased, after removing - _ and spaces):
#: never the default positive class of a binary task.
NEGATIVE_NAMES = frozenset(
    {"0", "no", "none", "normal", "negative", "neg", "healthy", "benign", "absent", "control",
     "nodr", "nodisease", "nofinding", "nonreferable", "false", "n"}
)  # fmt: skip


def is_ordinal(class_names: Sequence[Any]) -> bool:
    """Whether the labels are grades (e.g. DR grades "0".."4"): more than two classes named by
    consecutive increasing integers. Graded labels are judged and selected by QWK; two classes
    are a binary task, judged by balanced accuracy and AUC.

    Parameters
    ----------
    class_names : sequence
        Class names in label order.

    Returns
    -------
    bool
    """
    try:
        vals = [int(str(c).strip()) for c in class_names]
    except ValueError:
        return False
    return len(vals) > 2 and all(b - a == 1 for a, b in zip(vals[:-1], vals[1:], strict=True))


def default_positive_class(class_names: Sequence[Any]) -> str:
    """The positive class of a two-class task when none is given: the class NOT named like a
    negative finding (:data:`NEGATIVE_NAMES`, also with a ``no``/``non`` prefix); when that does
    not single one out, the second class.

    Parameters
    ----------
    class_names : sequence of 2 names

    Returns
    -------
    str
    """
    names = [str(c) for c in class_names]

    def negative(name: str) -> bool:
        flat = "".join(ch for ch in name.lower() if ch.isalnum())
        return flat in NEGATIVE_NAMES or flat.startswith(("no", "non")) and len(flat) > 3

    marked = [negative(n) for n in names]
    if marked.count(True) == 1:
        return names[marked.index(False)]
    return names[1]


@dataclass(frozen=True)
class BinaryTask:
    """A binary view of the labels: positives are ``positive`` class indices, the score is the
    summed probability of those classes. ``prefix`` is ``"referable_"`` for DR, ``""`` for K==2."""

    name: str
    positive: tuple[int, ...]
    prefix: str

    def labels(self, y: np.ndarray) -> np.ndarray:
        """1 for the positive classes, 0 otherwise (int64, same length as ``y``)."""
        return np.isin(np.asarray(y), self.positive).astype(np.int64)

    def score(self, probs: np.ndarray) -> np.ndarray:
        """Summed probability of the positive classes (N,) float64 from ``probs`` (N, K)."""
        return np.asarray(probs, dtype=np.float64)[:, list(self.positive)].sum(axis=1)

    @property
    def score_name(self) -> str:
        """The score in words (``metrics.json`` and the model card)."""
        return f"sum of probabilities of classes {list(self.positive)}"


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a model and what they mean (module docstring).

    Make one with :meth:`of`, which fills the defaults once; the constructor takes the values as
    they are.

    Attributes
    ----------
    class_names : tuple of str
        Class names in logit order (K >= 2).
    ordinal : bool
        Graded labels (QWK is the selection metric; five grades are read as DR grades).
    positive_class : str or None
        The positive class of a two-class task (one of ``class_names``); ``None`` for more
        classes.
    """

    class_names: tuple[str, ...]
    ordinal: bool
    positive_class: str | None = None

    @classmethod
    def of(
        cls,
        class_names: Sequence[Any],
        ordinal: bool | None = None,
        positive_class: str | None = None,
    ) -> LabelSpace:
        """The label space of ``class_names``, with medtune's defaults filled in.

        Parameters
        ----------
        class_names : sequence
            Class names in logit order.
        ordinal : bool, optional
            Default :func:`is_ordinal` of the names.
        positive_class : str, optional
            For two classes, the positive one (default :func:`default_positive_class`);
            ignored for more classes.

        Returns
        -------
        LabelSpace

        Raises
        ------
        MedtuneError
            When ``positive_class`` is not one of two classes.
        """
        names = tuple(str(c) for c in class_names)
        graded = is_ordinal(names) if ordinal is None else bool(ordinal)
        positive = None
        if len(names) == 2:
            positive = default_positive_class(names) if positive_class is None else positive_class
            if str(positive) not in names:
                raise MedtuneError(
                    f"positive class {positive!r} is not one of the classes {list(names)}; pick "
                    "one of them"
                )
            positive = str(positive)
        return cls(names, graded, positive)

    @property
    def num_classes(self) -> int:
        """Number of classes, K."""
        return len(self.class_names)

    @property
    def is_dr_grading(self) -> bool:
        """Five ordinal classes, read as the International Clinical DR scale."""
        return self.ordinal and self.num_classes == len(DR_GRADE_NAMES)

    @property
    def grade_names(self) -> list[str]:
        """Names to show for each class, in logit order: DR grade names for DR grading
        (:data:`DR_GRADE_NAMES`), else the class names."""
        return list(DR_GRADE_NAMES) if self.is_dr_grading else list(self.class_names)

    @property
    def referral_classes(self) -> tuple[int, ...] | None:
        """Class indices that count as "refer": grades >= 2 for DR, the positive class for two
        classes; ``None`` when the model has no referral task."""
        if self.is_dr_grading:
            return tuple(range(REFERABLE_MIN_GRADE, len(DR_GRADE_NAMES)))
        if self.num_classes == 2:
            return (self.class_names.index(self._positive),)
        return None

    @property
    def referral_name(self) -> str | None:
        """What a positive referral means, in words (``None`` when there is no referral)."""
        if self.is_dr_grading:
            return f"referable DR (grade >= {REFERABLE_MIN_GRADE})"
        if self.num_classes == 2:
            return f"positive class {self._positive}"
        return None

    @property
    def binary_task(self) -> BinaryTask | None:
        """The binary question behind the headline sensitivity, specificity and AUC: referable
        DR (grades >= 2) for five DR grades, the positive class for two classes, else None."""
        positive = self.referral_classes
        if positive is None:
            return None
        prefix = "referable_" if self.is_dr_grading else ""
        return BinaryTask(str(self.referral_name), positive, prefix)

    @property
    def _positive(self) -> str:
        """The positive class of two classes (the default when the value was built bare)."""
        if self.positive_class in self.class_names:
            return str(self.positive_class)
        return default_positive_class(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """``class_names``, ``ordinal`` and ``positive_class`` as plain JSON values."""
        return {
            "class_names": list(self.class_names),
            "ordinal": self.ordinal,
            "positive_class": self.positive_class,
        }
