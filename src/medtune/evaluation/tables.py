"""Plain-text metric tables for the terminal (headline figures with 95% intervals)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medtune.evaluation.metrics import HEADLINE_METRICS

SYNTHETIC_NOTE = (
    "NOTE: the data is SYNTHETIC (lesions drawn on one photograph); not a clinical result."
)


def format_value(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    ci = metrics.get(f"{key}_ci")
    if ci and None not in ci:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


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
    if synthetic:
        lines.append(SYNTHETIC_NOTE)
    return "\n".join(line.rstrip() for line in lines)
