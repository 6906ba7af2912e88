"""``medtune predict``: probabilities, decoded class and optional Grad-CAM for image files.

The run's own preprocessing (fundus crop, size, normalisation), temperature and decoding are
applied automatically. With an exported ``model.onnx`` the ONNX Runtime predictor is used instead
(no PyTorch in the loop).
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medtune.data.images import is_listed_image, iter_image_files
from medtune.data.preprocess import prepare_image
from medtune.errors import BadImageError, MedtuneError
from medtune.io import write_text
from medtune.runs import RunFolder

BATCH = 32


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise MedtuneError(f"{item}: no file matches this pattern; check the path")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.extend(iter_image_files(path))
            elif path.is_file():
                if glob.has_magic(item) and not is_listed_image(path):  # walker's rule
                    continue
                found.append(path)
            else:
                raise MedtuneError(f"{path}: no such file or folder; check the path")
    if not found:
        raise MedtuneError(f"{', '.join(inputs)}: no images found; give image files or folders")
    return found


def predict(
    inputs: Sequence[str | Path],
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    out: str | Path | None = None,
    explain: str | Path | None = None,
    tta: str = "none",
    skip_bad: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Predict the class of every image with a trained run or an exported ONNX model.

    The model's own preprocessing (field-of-view crop, image size, normalisation), temperature
    and decoding are applied.

    Parameters
    ----------
    inputs : sequence of str or pathlib.Path
        Image files, folders (searched recursively, hidden and system files skipped) and glob
        patterns.
    run : str or pathlib.Path, optional
        A run folder (PyTorch, in the precision the run validated in).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` with its ``model.json`` (ONNX Runtime, no PyTorch).
        Exactly one of ``run`` and ``model_path`` is given.
    out : str or pathlib.Path, optional
        Write the rows as CSV here (atomically); skipped images go to ``<out>.skipped.csv``.
    explain : str or pathlib.Path, optional
        Folder for Grad-CAM overlays (Selvaraju et al. 2017, ``grad-cam`` package), one PNG per
        image named after it (``run`` only).
    tta : {"none", "rot90"}, default "none"
        Average the logits of the four 90-degree rotations.
    skip_bad : bool, default False
        Leave unreadable images out (listed) instead of failing.
    progress : bool, default True

    Returns
    -------
    list of dict
        One per image: ``image``, ``pred`` (class name), ``pred_index``, ``p_<class>`` (the
        calibrated probability of each class).

    Raises
    ------
    MedtuneError
        For no or both model sources, no images found, or an unreadable image (naming the file)
        without ``skip_bad``.
    """
    inputs = [str(item) for item in inputs]
    if (run is None) == (model_path is None):
        raise MedtuneError("give either run (a run folder) or model_path (an exported model.onnx)")
    paths = expand_inputs(inputs)
    if model_path is not None:
        if explain:
            raise MedtuneError(
                "explain needs run (Grad-CAM needs the PyTorch model, not model.onnx)"
            )
        rows, skipped = _predict_onnx(paths, Path(model_path), tta, skip_bad, progress)
    else:
        rows, skipped = _predict_run(paths, Path(run), explain, tta, skip_bad, progress)
    if out:
        write_text(out, to_csv(rows))
        if skipped:
            write_text(
                Path(out).with_suffix(".skipped.csv"),
                "image,reason\n" + "".join(f'"{p}","{r}"\n' for p, r in skipped),
            )
    return rows


def to_csv(rows: Iterable[dict]) -> str:
    rows = list(rows)
    if not rows:
        return ""
    header = list(rows[0])
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(_cell(row[k]) for k in header))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return f'"{text}"' if any(c in text for c in ',"\n') else text


def _load_batch(paths, size, fundus, skip_bad, skipped):
    images, kept = [], []
    for path in paths:
        try:
            images.append(prepare_image(path, size, fundus))
            kept.append(path)
        except BadImageError as err:
            if not skip_bad:
                raise
            skipped.append((str(path), str(err)))
    return kept, (np.stack(images) if images else None)


def _rows(paths, probs, labels, class_names) -> list[dict]:
    rows = []
    for path, p, label in zip(paths, probs, labels, strict=True):
        row = {"image": str(path), "pred": class_names[int(label)], "pred_index": int(label)}
        row.update({f"p_{c}": float(v) for c, v in zip(class_names, p, strict=True)})
        rows.append(row)
    return rows


def _batches(paths: list[Path], progress: bool):
    starts = range(0, len(paths), BATCH)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
        yield paths[start : start + BATCH]


def _predict_onnx(paths, model_path, tta, skip_bad, progress):
    predictor = loaded_model("onnx", model_path)
    fundus = predictor.sidecar.get("fundus") or {"crop": False}
    rows, skipped = [], []
    for chunk in _batches(paths, progress):
        kept, images = _load_batch(chunk, predictor.image_size, fundus, skip_bad, skipped)
        if images is None:
            continue
        result = predictor.predict(images, tta=None if tta == "none" else tta)
        rows += _rows(kept, result.probs, result.labels, predictor.class_names)
    return rows, skipped


def _predict_run(paths, run, explain, tta, skip_bad, progress):
    import torch

    from medtune.evaluation.calibration import apply_temperature
    from medtune.evaluation.decoding import decode
    from medtune.evaluation.inference import predict_logits

    folder = RunFolder(run)
    model, meta = loaded_model("run", run)
    bf16 = _validated_in_bf16(folder)
    rows, skipped, written = [], [], set()

    def load(chunk: list[Path]) -> tuple[list[Path], np.ndarray | None]:
        return _load_batch(chunk, meta.image_size, meta.fundus, skip_bad, skipped)

    for kept, images in _prefetched(_batches(paths, progress), load):
        if images is None:
            continue
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
        logits = predict_logits(model, [batch], mean=meta.mean, std=meta.std, tta=tta, bf16=bf16)
        probs = apply_temperature(logits, meta.temperature)
        labels = decode(probs, meta.decoding)
        rows += _rows(kept, probs, labels, meta.class_names)
        if explain:
            _write_gradcam(model, meta, kept, images, labels, Path(explain), written)
    return rows, skipped


def loaded_model(kind: str, path: Path):  # noqa: ANN201
    """The model at ``path`` (``kind`` "onnx": an :class:`OnnxPredictor`; "run": ``(model,
    meta)``), loaded once per process while its files are unchanged, so ``medtune serve`` does
    not reload it for every request."""
    path = Path(path)
    if kind == "onnx" and path.is_dir():
        path = path / "model.onnx"
    files = (
        [path, path.parent / "model.json"]
        if kind == "onnx"
        else [path / RunFolder.MODEL_WEIGHTS, path / RunFolder.MODEL_META]
    )
    stamp = tuple(_file_stamp(f) for f in files)
    return _load_model(kind, str(path.resolve()), stamp)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Changes when the file is rewritten (a new inode when replaced atomically)."""
    if not path.is_file():
        return None
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _load_model(kind: str, path: str, stamp: tuple):  # noqa: ANN202, ARG001 (stamp: cache key)
    if kind == "onnx":
        from medtune.deploy.onnx_predictor import OnnxPredictor

        return OnnxPredictor(path)
    return RunFolder(path).load_model()


def _prefetched(chunks: Iterable[list[Path]], load):  # noqa: ANN001, ANN202
    """``load(chunk)`` for each chunk, the next one decoded in a thread while the caller runs the
    model on the current one (Pillow's decoders and most NumPy/SciPy work release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for chunk in chunks:
            ahead = pool.submit(load, chunk)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()


def _validated_in_bf16(folder: RunFolder) -> bool:
    """Predict in the precision the run validated in (its temperature and decoding were fitted on
    those logits); bf16 is also 2.3x faster on a CPU with bf16 units (docs/performance.md)."""
    return folder.has_config() and folder.read_config().bf16


def _write_gradcam(model, meta, paths, images, labels, folder: Path, written: set) -> None:
    """One PNG per image, named after the image, always inside ``folder``."""
    from PIL import Image

    from medtune.evaluation.gradcam import gradcam_overlays
    from medtune.workflows.evaluate import target_layer

    overlays = gradcam_overlays(
        model, target_layer(model), images, meta.mean, meta.std, targets=[int(k) for k in labels]
    )
    for path, overlay in zip(paths, overlays, strict=True):
        target = safe_output_path(folder, f"{Path(path).stem}_gradcam.png")
        n = 1
        while target.exists() and target.name in written:  # a/x.png and b/x.png: x_gradcam_2
            n += 1
            target = safe_output_path(folder, f"{Path(path).stem}_gradcam_{n}.png")
        written.add(target.name)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        Image.fromarray(overlay).save(tmp, format="PNG")
        os.replace(tmp, target)


def safe_output_path(folder: Path, name: str) -> Path:
    """``folder/name`` with ``name`` reduced to safe characters: never a path outside ``folder``."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name).lstrip(".") or "image"
    folder.mkdir(parents=True, exist_ok=True)
    target = (folder / clean).resolve()
    if target.parent != folder.resolve():
        raise MedtuneError(f"{name}: refusing to write outside {folder}")
    return target
