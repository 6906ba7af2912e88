"""Plain-text metric tables for the terminal (headline figures with 95% intervals)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medtune.evaluation.metrics import HEADLINE_METRICS, SMALL_N

SYNTHETIC_NOTE = (
    "NOTE: the data is SYNTHETIC (lesions drawn on one photograph); not a clinical result."
)
SMALL_N_NOTE = (
    f"(n=...): the figure rests on fewer than {SMALL_N} cases (e.g. 4 negatives for "
    "specificity); treat it as unstable and read its interval."
)
NO_CI_NOTE = (
    "[no CI]: every bootstrap resample gave the same value, so no interval can be given "
    "(see warnings in metrics.json)."
)


def _small(metrics: Mapping[str, Any], key: str) -> bool:
    n = metrics.get(f"{key}_n")
    return metrics.get(key) is not None and n is not None and n < SMALL_N


def format_value(metrics: Mapping[str, Any], key: str) -> str:
    """``value [lo, hi]``, with ``(n=N)`` when it rests on fewer than ``SMALL_N`` cases and
    ``[no CI]`` when intervals were computed but none is valid for this figure."""
    value = metrics.get(key)
    if value is None:
        return "-"
    ci = metrics.get(f"{key}_ci")
    if ci and None not in ci:
        text = f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    elif metrics.get("intervals"):
        text = f"{value:.3f} [no CI]"
    else:
        text = f"{value:.3f}"
    return text + (f" (n={metrics[f'{key}_n']})" if _small(metrics, key) else "")


def metrics_table(metrics: Mapping[str, Any], *, synthetic: bool = False) -> str:
    """One column per split (val, test) and one row per headline metric."""
    splits = [s for s in ("val", "test") if s in metrics]
    rows = [
        (m.short, [format_value(metrics[s], m.key) for s in splits])
        for m in HEADLINE_METRICS
        if m.terminal and any(metrics[s].get(m.key) is not None for s in splits)
    ]
    rows.insert(0, ("images", [str(metrics[s].get("n", "-")) for s in splits]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(s), *(len(r[1][i]) for r in rows)) for i, s in enumerate(splits)]
    lines = ["  ".join([" " * width, *(s.ljust(c) for s, c in zip(splits, cols, strict=True))])]
    for label, values in rows:
        cells = (v.ljust(c) for v, c in zip(values, cols, strict=True))
        lines.append("  ".join([label.ljust(width), *cells]))
    positive = {metrics[s].get("positive") for s in splits} - {None}
    if positive and any(metrics[s].get("task") == "binary" for s in splits):
        lines.append(f"AUC, sensitivity and specificity are for the {positive.pop()}.")
    cells = [v for _, values in rows for v in values]
    if any("(n=" in v for v in cells):
        lines.append(SMALL_N_NOTE)
    if any("[no CI]" in v for v in cells):
        lines.append(NO_CI_NOTE)
    if synthetic:
        lines.append(SYNTHETIC_NOTE)
    return "\n".join(line.rstrip() for line in lines)
