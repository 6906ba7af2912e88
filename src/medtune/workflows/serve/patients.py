"""Photographs grouped into eyes and a patient, as a screening programme answers.

MINIMAL INTERFACE, to be unified with the per-eye and per-patient aggregation of
``medtune.evaluation.patients`` (being written beside this; issue 22, deliverable 1) when it
lands: the rules are the same ones.

* Per eye: the grade of its GRADABLE photographs (the maximum, as a grader reads the worst
  photograph of an eye), "ungradable" when it has none.
* Per patient: refer when either eye is referable; "insufficient quality" when no eye can be
  graded and none is referable; else no referral. This is the patient-level output of IDx-DR /
  LumineticsCore ("more than mild DR detected" / "negative" / "insufficient quality"; Abramoff
  et al., npj Digit Med 2018;1:39) and EyeArt (per eye and per patient; Ipp et al., JAMA Netw
  Open 2021;4:e2134254).

Eye sides come from the user (one choice per photograph) or, failing that, from the file name's
common patterns (``123_left.jpeg``, ``..._OD`` / ``..._OS``, ``..._R`` / ``..._L``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from medtune.evaluation.referral import UNGRADABLE

#: Patient-level answers.
REFER, NO_REFER, INSUFFICIENT = "refer", "no_refer", "insufficient_quality"
SIDES = ("right", "left", "unknown")
_SIDE_WORDS = {
    "right": "right",
    "left": "left",
    "od": "right",
    "os": "left",
    "r": "right",
    "l": "left",
    "re": "right",
    "le": "left",
}
_SIDE_PATTERN = re.compile(
    r"(?:^|[_\-\s.])(right|left|od|os|re|le|r|l)(?:[_\-\s.]?\d{1,3})?$", re.IGNORECASE
)


def side_from_name(name: str) -> str:
    """``right``/``left`` from a file name's last word, optionally followed by a photograph number
    (``12_left.jpeg``, ``p3_OD.png``, ``x-L.tif``, ``p17_right_2.jpg``), else ``unknown``."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", name.strip())
    found = _SIDE_PATTERN.search(stem)
    return _SIDE_WORDS[found.group(1).lower()] if found else "unknown"


def resolve_sides(names: Sequence[str], chosen: Sequence[str | None]) -> list[str]:
    """Each photograph's eye: the user's choice when it names one, else the file name's."""
    out = []
    for i, name in enumerate(names):
        pick = (chosen[i] if i < len(chosen) else None) or ""
        pick = pick.strip().lower()
        out.append(pick if pick in ("right", "left") else side_from_name(name))
    return out


def eye_result(side: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One eye from its photographs' rows.

    Returns
    -------
    dict
        ``side``, ``quality`` (``gradable``/``ungradable``), ``grade``/``grade_name`` (the
        highest grade among gradable photographs; ``None`` when none is gradable),
        ``p_referable`` (their highest), ``refer`` (``yes``/``no``/``ungradable``, or ``""``
        when the model has no validated referral).
    """
    gradable = [r for r in rows if r.get("quality") != UNGRADABLE]
    if not gradable:
        return {
            "side": side,
            "quality": UNGRADABLE,
            "grade": None,
            "grade_name": None,
            "p_referable": None,
            "refer": UNGRADABLE,
        }
    worst = max(gradable, key=lambda r: int(r["grade"]))
    p_ref = [r["p_referable"] for r in gradable if r.get("p_referable") is not None]
    flags = [r.get("refer") or "" for r in gradable]
    refer = "yes" if "yes" in flags else ("no" if "no" in flags else "")
    return {
        "side": side,
        "quality": "gradable",
        "grade": int(worst["grade"]),
        "grade_name": worst["grade_name"],
        "p_referable": max(p_ref) if p_ref else None,
        "refer": refer,
    }


def patient_result(eyes: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The patient's ``(referral, quality)`` from their eyes.

    Returns
    -------
    referral : {"refer", "no_refer", "insufficient_quality", ""}
        ``""`` when the model has no validated referral.
    quality : {"gradable", "partial", "ungradable"}
        All eyes gradable, some, or none.
    """
    gradable = [e for e in eyes if e["quality"] != UNGRADABLE]
    quality = "gradable" if len(gradable) == len(eyes) else ("partial" if gradable else UNGRADABLE)
    if any(e["refer"] == "yes" for e in eyes):
        return REFER, quality
    if not gradable:
        return INSUFFICIENT, quality
    if all(e["refer"] == "" for e in gradable):
        return "", quality
    return NO_REFER, quality


def group_eyes(sides: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`eye_result` for each side present, right eye first."""
    return [
        eye_result(side, [r for s, r in zip(sides, rows, strict=True) if s == side])
        for side in SIDES
        if side in sides
    ]
