"""``medtune demo``: the main job end to end on the embedded synthetic DR set (or real data)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medtune.evaluation.tables import SYNTHETIC_NOTE, format_value
from medtune.workflows.train import RunResult, train

DEMO_IMAGES_PER_GRADE = 60


def synthetic_data(out: Path, n_per_grade: int = DEMO_IMAGES_PER_GRADE) -> Path:
    """The synthetic fundus set (made once, reused by later demos)."""
    from medtune.data.synthetic import make_synthetic_dr

    folder = out / "synthetic-data"
    if not (folder / "labels.csv").is_file():
        print(f"making the SYNTHETIC DR data set ({5 * n_per_grade} images) in {folder} ...")
        make_synthetic_dr(folder, n_per_grade=n_per_grade, size=224, seed=0, progress=True)
    return folder


def run_demo(
    out: str | Path = "runs/demo",
    data: str | None = None,
    epochs: int = 3,
    n_per_grade: int = DEMO_IMAGES_PER_GRADE,
    **settings: Any,
) -> dict[str, RunResult]:
    """A linear probe (scenario 1) and a short fine-tune (scenario 2) of EfficientNet-Lite0.

    Parameters
    ----------
    out : path, default "runs/demo"
        Folder for the synthetic data, the cache and the two run folders.
    data : str, optional
        Real labelled images instead of the synthetic set.
    epochs : int, default 3
        Fine-tuning epochs (the probe ignores them).
    n_per_grade : int, default 60
        Synthetic images per DR grade.
    **settings
        Further :class:`~medtune.config.TrainConfig` settings for both runs (e.g. a smaller
        ``image_size`` in tests).

    Returns
    -------
    dict
        ``{"linear-probe": RunResult, "finetune": RunResult}``. Prints a comparison table, then
        evaluates each run on its test split, which writes ``RUN/eval/test/report.html`` (with
        ``metrics.json``, ``summary.md`` and ``MODEL_CARD.md``), and prints the report paths.
    """
    out = Path(out)
    synthetic = data is None
    source = str(synthetic_data(out, n_per_grade)) if synthetic else data
    common = {"data": source, "synthetic": synthetic, "cache_dir": str(out / "cache"), **settings}
    started = time.perf_counter()
    runs = {
        "linear-probe": train(out=str(out / "linear-probe"), strategy="linear-probe", **common),
        "finetune": train(
            out=str(out / "finetune"),
            strategy="finetune",
            epochs=epochs,
            lr=0.02,
            warmup_epochs=0.5,
            early_stopping=None,
            **common,
        ),
    }
    print(demo_table(runs, synthetic))
    for name, report in write_reports(runs, progress=common.get("progress", True)).items():
        print(f"{name} report: {report}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; run folders under {out}")
    return runs


def write_reports(runs: dict[str, RunResult], progress: bool = True) -> dict[str, Path]:
    """``medtune evaluate RUN`` for each run: the test split's report, ``{name: report.html}``."""
    from medtune.workflows.evaluate import evaluate

    return {name: evaluate(run.dir, progress=progress).report for name, run in runs.items()}


def demo_table(runs: dict[str, RunResult], synthetic: bool) -> str:
    keys = ("accuracy", "qwk", "macro_auc", "referable_auc")
    header = f"{'strategy':<14}{'seconds':>8}  " + "  ".join(f"test {k:<24}" for k in keys)
    lines = [header]
    for name, run in runs.items():
        split = run.metrics.get("test") or run.metrics["val"]
        cells = "  ".join(f"{format_value(split, k):<29}" for k in keys)
        lines.append(f"{name:<14}{run.seconds:>8.0f}  {cells}")
    if synthetic:
        lines.append(SYNTHETIC_NOTE)
    return "\n".join(lines)
