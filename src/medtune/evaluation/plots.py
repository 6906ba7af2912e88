"""Report figures as PNG bytes (matplotlib Agg canvas).

Each function builds a :class:`matplotlib.figure.Figure` on an explicit Agg canvas: no pyplot,
no global backend switch, no figure registry to leak. PNGs are saved without the "Software"
metadata (which would carry a URL into the report).
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from medtune.config import OPERATING_POINTS

__all__ = [
    "GradcamExample",
    "class_balance_png",
    "confusion_png",
    "gradcam_png",
    "prediction_caption",
    "reliability_png",
    "roc_png",
    "training_curves_png",
]

_DPI = 110

#: Operating points in words (legends and tables), e.g. ``sens90 (>= 90% sensitivity)``.
OPERATING_POINT_LABELS = {
    name: f"{name} (>= {target * 100:g}% sensitivity)"
    if target is not None
    else f"{name} (max sensitivity + specificity - 1)"
    for name, target in OPERATING_POINTS.items()
}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def class_balance_png(
    counts: Mapping[str, int] | Mapping[str, Mapping[str, int]],
    class_names: Sequence[str] | None = None,
) -> bytes:
    """Bar chart of images per class: ``{class: n}`` or grouped ``{split: {class: n}}``."""
    grouped = bool(counts) and all(isinstance(v, Mapping) for v in counts.values())
    series: dict[str, Mapping[str, int]] = dict(counts) if grouped else {"all": counts}  # type: ignore
    names = list(class_names) if class_names else sorted({c for d in series.values() for c in d})
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for j, (split, d) in enumerate(series.items()):
        vals = [int(d.get(c, 0)) for c in names]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=str(split))
        ax.bar_label(bars, fontsize=7)
    long = max((len(str(n)) for n in names), default=0) > 6
    ax.set_xticks(x, names, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_xlabel("grade")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.12)  # room for the bar labels
    ax.set_title("Images per grade")
    if len(series) > 1:  # beside the axes, never over the bars
        ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def _read_curves(path: str | os.PathLike[str]) -> tuple[str, dict[str, dict[float, list[float]]]]:
    """``(x column, {metric: {x: [values]}})`` from a Lightning CSVLogger ``metrics.csv`` (sparse
    rows); x is ``epoch`` when the log has it, else ``step``."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return "epoch", {}
    xkey = "epoch" if "epoch" in rows[0] else "step"
    out: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        try:
            x = float(row.get(xkey) or "nan")
        except ValueError:
            continue
        if math.isnan(x):
            continue
        for key, val in row.items():
            if key in ("epoch", "step") or key is None or val in (None, ""):
                continue
            try:
                v = float(val)
            except ValueError:
                continue
            if math.isfinite(v):
                out.setdefault(key, {}).setdefault(x, []).append(v)
    return xkey, out


def _skip_curve(name: str) -> bool:
    """Columns that are not quality metrics: learning rates, counts, timings."""
    low = name.lower()
    return low.startswith("lr") or "lr-" in low or low.endswith(("_n", "_count", "time"))


def curve_label(key: str) -> str:
    """A log column in words: ``train_loss_epoch`` -> "training loss", ``val_qwk`` ->
    "validation quadratic weighted kappa" (labels of :data:`metrics.HEADLINE_METRICS`)."""
    from medtune.evaluation.metrics import HEADLINE_METRICS  # sklearn: only when plotting

    base = key.removesuffix("_epoch").removesuffix("_step")
    split, _, metric = base.partition("_")
    where = {"train": "training", "val": "validation", "test": "test"}.get(split)
    if where is None:
        return key
    labels = {m.key: m.label.lower() for m in HEADLINE_METRICS} | {"loss": "loss"}
    label = labels.get(metric, metric.replace("_", " "))
    return f"{where} {label[:1].lower()}{label[1:]}" if label else where


def _epoch_curves(curves: dict[str, dict[float, list[float]]]) -> dict[str, dict[float, list]]:
    """Per-epoch series only: a ``*_step`` column is dropped when its ``*_epoch`` twin (or the
    plain column) exists, and a step column with a single point is never drawn."""
    out = {}
    for key, pts in curves.items():
        if key.endswith("_step"):
            stem = key.removesuffix("_step")
            if f"{stem}_epoch" in curves or stem in curves or len(pts) < 2:
                continue
        out[key] = pts
    return out


def training_curves_png(path: str | os.PathLike[str]) -> bytes | None:
    """Loss and metric curves from a Lightning ``metrics.csv`` (per-epoch means of whatever
    columns exist; learning rates and counts skipped); ``None`` if nothing can be plotted."""
    xkey, curves = _read_curves(path)
    if not curves:
        return None
    curves = _epoch_curves(curves)
    losses = {k: v for k, v in curves.items() if "loss" in k.lower()}
    others = {k: v for k, v in curves.items() if k not in losses and not _skip_curve(k)}
    panels = [(t, d) for t, d in (("loss", losses), ("metrics", others)) if d]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.6), layout="constrained")
    for i, (title, d) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for name, pts in sorted(d.items()):
            xs = sorted(pts)
            ys = [float(np.mean(pts[x])) for x in xs]
            ax.plot(xs, ys, marker="o", ms=3, label=curve_label(name))
        ax.set_xlabel(xkey)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def roc_png(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    binary: tuple[str, np.ndarray, np.ndarray] | None = None,
    operating_points: Mapping[str, Mapping[str, Any]] | None = None,
) -> bytes:
    """One-vs-rest ROC curve per class, plus a bold binary curve ``(name, y_bin, score)`` (e.g.
    referable DR) with its operating points (``{name: {"sensitivity", "specificity"}}``)."""
    y = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    panels = 2 if binary is not None else 1
    fig = Figure(figsize=(5.0 * panels, 4.6), layout="constrained")
    ax = fig.add_subplot(1, panels, 1)
    for k, name in enumerate(class_names):
        yk = y == k
        if 0 < yk.sum() < len(y):
            fpr, tpr, _ = roc_curve(yk, probs[:, k])
            ax.plot(fpr, tpr, lw=1.2, label=str(name))
    _roc_axes(ax, "One-vs-rest ROC")
    if binary is not None:
        name, y_bin, score = binary
        ax2 = fig.add_subplot(1, panels, 2)
        y_bin = np.asarray(y_bin)
        if 0 < y_bin.sum() < len(y_bin):
            fpr, tpr, _ = roc_curve(y_bin, score)
            ax2.plot(fpr, tpr, lw=2.2, color="black", label=name)
        for op, d in (operating_points or {}).items():
            if d.get("sensitivity") is not None and d.get("specificity") is not None:
                label = OPERATING_POINT_LABELS.get(op, op)
                ax2.plot(1 - d["specificity"], d["sensitivity"], "o", ms=7, label=label)
        _roc_axes(ax2, f"ROC: {name}")
    return _png(fig)


def _roc_axes(ax: Any, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def confusion_png(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Confusion matrix (rows = true class): counts and row-normalised side by side."""
    counts = np.asarray(cm, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    fig = Figure(
        figsize=(2 * max(4.5, 0.8 * n + 2.5), max(3.8, 0.7 * n + 2.2)), layout="constrained"
    )
    long = max((len(str(c)) for c in class_names), default=0) > 6
    for i, (mat, title, fmt) in enumerate(
        ((counts, "counts", "{:.0f}"), (norm, "row-normalised (recall)", "{:.2f}")), start=1
    ):
        ax = fig.add_subplot(1, 2, i)
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for r in range(n):
            for c in range(n):
                dark = mat[r, c] > 0.6 * (mat.max() or 1)
                ax.text(
                    c,
                    r,
                    fmt.format(mat[r, c]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(
            range(n), class_names, rotation=30 if long else 0, ha="right" if long else "center"
        )
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("true grade")
        ax.set_title(title)
        bar = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.03)
        bar.set_label("images" if i == 1 else "share of the true grade")
        if i == 1:  # counts: whole numbers only
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
    return _png(fig)


def reliability_png(curve: Mapping[str, Any]) -> bytes:
    """Reliability diagram from :func:`calibration.reliability_curve` data, with bin counts."""
    edges = np.asarray(curve["bin_edges"], dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    acc = np.array([np.nan if v is None else v for v in curve["accuracy"]], dtype=np.float64)
    conf = np.array([np.nan if v is None else v for v in curve["confidence"]], dtype=np.float64)
    fig = Figure(figsize=(5.4, 6.0), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = np.isfinite(acc)
    ax.bar(centers[ok], acc[ok], width=width[ok], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(conf[ok], acc[ok], "o", color="darkred", ms=3, label="mean confidence of the bin")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (top-label), ECE = {curve['ece']:.3f}")
    # below the figure, never over the bars
    fig.legend(fontsize=7, loc="outside lower center", ncol=3, frameon=False)
    ax.tick_params(labelbottom=False)
    ax2.bar(centers, curve["count"], width=width, color="grey", edgecolor="black")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("confidence (probability of the predicted grade)")
    ax2.set_ylabel("images")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
    return _png(fig)


@dataclass(frozen=True)
class GradcamExample:
    """One Grad-CAM panel: the network input, its map and a caption.

    Attributes
    ----------
    image : ndarray of uint8, shape (H, W, 3)
        The preprocessed network input.
    cam : ndarray of float, shape (H, W)
        Grad-CAM map in [0, 1] (:func:`medtune.evaluation.gradcam.gradcam_maps`).
    caption : str
        What the panel shows (:func:`prediction_caption`).
    """

    image: np.ndarray
    cam: np.ndarray
    caption: str


def prediction_caption(predicted: str, p: float, true: str | None = None) -> str:
    """``"predicted: Moderate NPDR, P = 0.62; true: Severe NPDR"`` (P: the calibrated
    probability of the predicted grade)."""
    text = f"predicted: {predicted}, P = {p:.2f}"
    return text if true is None else f"{text}\ntrue: {true}"


GRADCAM_NOTE = (
    "Colour: Grad-CAM (Selvaraju et al. 2017) for the predicted grade, inside the field of view; "
    "1 = where this image's map peaks, not a probability. P = calibrated probability of the "
    "predicted grade (with expected-grade decoding the predicted grade need not be the most "
    "probable one)."
)


def gradcam_png(
    examples: Sequence[GradcamExample], *, ncols: int = 4, title: str | None = None
) -> bytes:
    """Grad-CAM figure: each image with its map masked to the field of view (the black border
    stays black), a caption under it, one shared colour bar and a note on what the numbers are.

    Used by the report (several examples) and ``predict --explain`` (one), so both look alike.

    Parameters
    ----------
    examples : sequence of GradcamExample
        The panels.
    ncols : int, default 4
        Panels per row.
    title : str, optional
        Figure title (e.g. the image name).

    Returns
    -------
    bytes
        PNG.
    """
    from matplotlib import colormaps

    from medtune.data.fundus import field_of_view_mask

    n = max(len(examples), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.1 * ncols + 1.2, 3.5 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["jet"]
    mappable = None
    for ax, ex in zip(axes.ravel(), examples, strict=False):
        img = np.asarray(ex.image)
        cam = np.clip(np.asarray(ex.cam, dtype=np.float64), 0.0, 1.0)
        inside = field_of_view_mask(img)
        ax.imshow(img)
        mappable = ax.imshow(
            np.ma.masked_where(~inside, cam), cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.45
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(ex.caption, fontsize=9)
    for ax in axes.ravel()[len(examples) :]:
        ax.axis("off")
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.8, pad=0.02)
        bar.set_label("Grad-CAM relevance (0 = none, 1 = the image's maximum)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(
        0.5,
        -0.01,
        textwrap.fill(GRADCAM_NOTE, 30 * ncols + 40),
        ha="center",
        va="top",
        fontsize=8,
        color="#444444",
    )
    return _png(fig)
