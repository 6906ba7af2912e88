"""Shared helpers of the benchmark scripts: the data subset, timers, memory and scores.

Every contender reads the same :class:`Spec` (written to JSON by ``run.py``) and builds nothing
on its own: the image subset, its split, the image size, batch size, epochs and the pretrained
weights are fixed here, once, for all of them.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "aptos2019-224"


@dataclass
class Spec:
    """What every contender gets: the same images, size, batch, epochs and weights."""

    data: str
    work: str
    n_train: int
    n_val: int
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 3
    seed: int = 0
    repeats: int = 3
    weights_file: str = ""
    train_dir: str = ""
    val_dir: str = ""
    class_names: list[str] = field(default_factory=list)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> Spec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- data subset


def check_data(data: Path) -> str | None:
    """``None`` when ``data`` is an APTOS-style folder, else what is missing."""
    if not data.is_dir():
        return f"{data}: folder not found"
    if not (data / "labels.csv").is_file():
        return f"{data}: no labels.csv (image,label)"
    if not (data / "images").is_dir():
        return f"{data}: no images/ folder"
    return None


def choose_subset(data: Path, n_train: int, n_val: int, seed: int) -> dict[str, list[tuple]]:
    """A seeded, stratified train/val subset; one image per duplicate group (no leakage)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    table = data / "metadata.csv"
    df = pd.read_csv(table if table.is_file() else data / "labels.csv")
    if "dup_group" in df.columns:
        dup = df["dup_group"].notna()
        df = pd.concat([df[~dup], df[dup].drop_duplicates("dup_group")]).sort_values("image")
    df = df[[(data / "images" / name).is_file() for name in df["image"]]]
    if n_train + n_val > len(df):
        raise SystemExit(f"{data}: only {len(df)} usable images, asked for {n_train + n_val}")
    rest = len(df) - n_train - n_val
    pick, _ = (
        train_test_split(df, train_size=n_train + n_val, stratify=df["label"], random_state=seed)
        if rest > 0
        else (df, None)
    )
    train, val = train_test_split(
        pick, train_size=n_train, stratify=pick["label"], random_state=seed
    )
    as_rows = lambda d: sorted(zip(d["image"], d["label"].astype(int), strict=True))  # noqa: E731
    return {"train": as_rows(train), "val": as_rows(val)}


def link_class_folders(data: Path, rows: list[tuple], out: Path) -> None:
    """``out/<label>/<image>`` symlinks to the originals (the ImageFolder layout all can read)."""
    for name, label in rows:
        dst = out / str(label) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(data / "images" / name, dst)


def build_subset(spec: Spec, n_images: int, val_fraction: float) -> None:
    """Fill ``spec``'s train/val folders (symlinks) with a seeded, stratified subset."""
    data, work = Path(spec.data), Path(spec.work)
    spec.n_val = max(1, round(n_images * val_fraction))
    spec.n_train = n_images - spec.n_val
    rows = choose_subset(data, spec.n_train, spec.n_val, spec.seed)
    classes = sorted({y for _, y in rows["train"]})
    for part in ("train", "val"):
        counts = [sum(y == c for _, y in rows[part]) for c in classes]
        if min(counts) < 2 or len(counts) != len({y for _, y in rows[part]}):
            raise SystemExit(f"--n-images is too small: {part} has {counts} images per grade")
    subset = work / f"subset-{spec.n_train}-{spec.n_val}-s{spec.seed}"
    for part in ("train", "val"):
        link_class_folders(data, rows[part], subset / part)
    spec.train_dir, spec.val_dir = str(subset / "train"), str(subset / "val")
    spec.class_names = [str(c) for c in classes]


def write_lite0_weights(work: Path) -> Path:
    """medtune's Lite0 weights as a timm state dict file (fastai loads them through timm)."""
    import torch

    from medtune.models import create_backbone

    path = work / "tf_efficientnet_lite0-medtune.pth"
    if not path.is_file():
        backbone = create_backbone("efficientnet_lite0")
        state = dict(backbone.model.body.state_dict())
        state["classifier.weight"] = backbone.imagenet_head.weight.detach()
        state["classifier.bias"] = backbone.imagenet_head.bias.detach()
        torch.save(state, path)
    return path


def image_files(folder: str | Path) -> list[tuple[Path, int]]:
    """``(path, label)`` of a class-folder tree, sorted (class folders are integer grades)."""
    root = Path(folder)
    return sorted(
        (p, int(p.parent.name)) for p in root.glob("*/*") if p.suffix.lower() in {".png", ".jpg"}
    )


# --------------------------------------------------------------------------- measuring


class Clock:
    """Seconds since the contender started (one origin for every timestamp it reports)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls and the last call's result."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (MB)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self_mb": self_kb / 1024, "largest_child_mb": child_kb / 1024}


def qwk(y: Iterable[int], pred: Iterable[int]) -> float:
    """Quadratic weighted kappa of hard predictions (:func:`medtune.evaluation.scores.qwk`).

    The benchmark tables show 0 where kappa is undefined (a model that predicts one grade for
    every image), as the published tables did."""
    from medtune.evaluation.scores import qwk as medtune_qwk

    y, pred = np.asarray(list(y)), np.asarray(list(pred))
    k = medtune_qwk(y, pred, int(max(y.max(), pred.max())) + 1)
    return float(k) if np.isfinite(k) else 0.0


def rewrite_block(path: Path, begin: str, end: str, block: str, heading: str) -> None:
    """Replace the generated ``block`` (which starts with ``begin`` and ends with ``end``) in the
    doc at ``path``, keeping the prose around it; a doc without the markers gets the block
    appended (a new doc starts with ``heading``). Hand-written because it is four lines of
    string splitting that no documentation tool we use does for markdown."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (old.rstrip() + "\n\n" if old else heading + "\n\n") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def machine() -> str:
    """The CPU model (``lscpu``), logical CPU count and OS: every benchmark table names it."""
    import os
    import platform
    import subprocess

    text = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Model name" in ln)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    flags = next((ln for ln in text.splitlines() if ln.startswith("Flags")), "")
    extras = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags.split()]
    cpu = f"{model} ({', '.join(extras) or 'no bf16/VNNI/AMX'})"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def say(msg: str) -> None:
    """Progress on stderr (stdout of ``run.py`` is the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    result["peak_rss"] = peak_rss_mb()
    Path(path).write_text(json.dumps(result, indent=1), encoding="utf-8")
