"""Export a trained classifier to ONNX or TorchScript with a JSON sidecar and a parity check.

The model takes normalised float32 NCHW RGB and returns logits. Given the run's site-shift model,
an ONNX export also returns ``features`` (the pooled features the head sees) and writes
``site_shift.npz`` beside it, so deployed predictions carry the same per-image site-shift score
as ``predict --run``. The export is written to a temp name, checked (``onnx.checker`` for ONNX)
and compared with PyTorch on the caller's real images;
only when the probabilities agree within ``tolerance`` is it renamed to ``model.onnx`` /
``model.ts`` and ``model.json`` written. A failed check raises :class:`MedtuneError` and leaves
no model file behind.

ONNX export uses the TorchScript-based exporter (``dynamo=False``: no extra packages, dynamic
batch via ``dynamic_axes``) and falls back to the dynamo exporter (needs ``onnxscript``) when the
legacy one is missing or fails; ``onnx_exporter`` forces either.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtune.data.normalise import normalise_images
from medtune.deploy.onnx_predictor import (
    FEATURES_NAME,
    INPUT_LAYOUT,
    INPUT_NAME,
    OUTPUT_NAME,
    SIDECAR_NAME,
    SITE_SHIFT_NAME,
    OnnxPredictor,
    validate_sidecar,
)
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.inference import head_input
from medtune.evaluation.shift import SiteShiftModel
from medtune.io import atomic_path, write_json

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
ONNX_EXPORTERS = ("auto", "legacy", "dynamo")
MIN_OPSET = 17
PARITY_BATCH = 8


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how closely the export matches PyTorch."""

    model_path: Path
    sidecar_path: Path
    fmt: str
    max_abs_diff: float  # max |p_torch - p_export| over parity images and classes
    max_abs_logit_diff: float
    n_parity_images: int
    sidecar: dict[str, Any]
    site_shift_path: Path | None = None


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "onnx",
    image_size: int,
    sidecar: dict[str, Any],
    parity_inputs: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    tolerance: float = 1e-4,
    opset: int = MIN_OPSET,
    onnx_exporter: str = "auto",
    site_shift: SiteShiftModel | None = None,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` (``model.onnx`` or ``model.ts`` + ``model.json``).

    ``parity_inputs`` are real uint8 images, N x image_size x image_size x 3 RGB; the exported
    model's ``softmax(logits / temperature)`` must match PyTorch's within ``tolerance``.
    ``sidecar`` holds at least ``class_names``; ``temperature`` (default 1) and ``decoding``
    (default argmax) are optional and any other keys (e.g. ``fundus``) are kept.
    ``site_shift`` (ONNX only; the model needs a ``head``): the graph gets a second output
    ``features`` (checked against PyTorch too), ``site_shift.npz`` is written beside it and the
    sidecar's ``site_shift`` names it with its threshold.
    """
    if fmt not in FORMATS:
        raise MedtuneError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise MedtuneError(f"unknown ONNX exporter {onnx_exporter!r}; use {ONNX_EXPORTERS}")
    if opset < MIN_OPSET:
        raise MedtuneError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer")
    with_features = site_shift is not None and fmt == "onnx"
    if with_features:
        sidecar = {**sidecar, "site_shift": _site_shift_entry(site_shift)}
    meta = build_sidecar(sidecar, fmt=fmt, image_size=image_size, mean=mean, std=std)
    images = _as_uint8_images(parity_inputs, image_size)
    x = normalise_images(images, meta["mean"], meta["std"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / FORMATS[fmt]
    with _cpu_eval_copy(model) as net:
        ref_logits = _torch_logits(net, x)
        if ref_logits.shape[1] != len(meta["class_names"]):
            raise MedtuneError(
                f"model has {ref_logits.shape[1]} outputs but the sidecar lists "
                f"{len(meta['class_names'])} class names; pass matching class_names"
            )
        with atomic_path(model_path) as tmp:
            if fmt == "onnx":
                graph = LogitsAndFeatures(net).eval() if with_features else net
                used = _export_onnx(graph, tmp, _example_batch(x), opset, onnx_exporter)
                meta["opset"] = _check_onnx(tmp, opset, with_features)
                meta["onnx_exporter"] = used
                exp_logits = _onnx_logits(tmp, meta, images)
                if with_features:
                    _check_features(graph, tmp, meta, images, x)
            else:
                _export_torchscript(net, tmp, _example_batch(x))
                exp_logits = _torchscript_logits(tmp, x)
            diff, logit_diff = _parity(ref_logits, exp_logits, meta["temperature"])
            if not diff <= tolerance:
                raise MedtuneError(
                    f"{model_path}: parity check failed: {fmt} probabilities differ from PyTorch "
                    f"by {diff:.3g} (max abs, tolerance {tolerance:g}) on {len(images)} images; "
                    "nothing was written; check for unsupported layers or retry another format"
                )
    meta["parity"] = {
        "max_abs_diff": diff,
        "max_abs_logit_diff": logit_diff,
        "n_images": len(images),
        "tolerance": tolerance,
    }
    shift_path = site_shift.save(out / SITE_SHIFT_NAME) if with_features else None
    sidecar_path = out / SIDECAR_NAME
    write_json(sidecar_path, meta)
    return ExportResult(
        model_path, sidecar_path, fmt, diff, logit_diff, len(images), meta, shift_path
    )


class LogitsAndFeatures(nn.Module):
    """``model`` returning ``(logits, features)``: the head's input is captured by a forward
    pre-hook (:func:`medtune.evaluation.inference.head_input`), which tracing follows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._head = head_input(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self._head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, captured[0].flatten(1)


def _site_shift_entry(model: SiteShiftModel) -> dict[str, Any]:
    """The sidecar's ``site_shift``: where the arrays are, and the scalars a reader needs."""
    return {"file": SITE_SHIFT_NAME, **model.to_dict(arrays=False)}


def _check_features(
    graph: nn.Module, path: Path, meta: dict[str, Any], images: np.ndarray, x: np.ndarray
) -> None:
    """The exported ``features`` output must match PyTorch's (what the site shift scores)."""
    with torch.no_grad():
        ref = torch.cat(
            [
                graph(torch.from_numpy(x[i : i + PARITY_BATCH]))[1]
                for i in range(0, len(x), PARITY_BATCH)
            ]
        ).numpy()
    got = OnnxPredictor(path, sidecar=meta, batch_size=PARITY_BATCH).logits_and_features(images)[1]
    gap = float(np.abs(ref - got).max())
    if not gap <= 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise MedtuneError(
            f"{path.name}: exported features differ from PyTorch's by {gap:.3g}; nothing was "
            "written; export without the site-shift model or retry another exporter"
        )


# ---------------------------------------------------------------------------------------------
# sidecar and inputs
# ---------------------------------------------------------------------------------------------

_OWNED_KEYS = ("format", "model_file", "image_size", "mean", "std", "input_layout")


def build_sidecar(
    sidecar: dict[str, Any],
    *,
    fmt: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """Caller's sidecar plus the fields export owns; raises on a conflicting caller value."""
    from medtune.version import __version__

    owned: dict[str, Any] = {
        "format": fmt,
        "model_file": FORMATS[fmt],
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "input_layout": INPUT_LAYOUT,
    }
    for key in _OWNED_KEYS:
        if key in sidecar and sidecar[key] != owned[key]:
            raise MedtuneError(
                f"sidecar field {key!r}={sidecar[key]!r} conflicts with the export argument "
                f"{owned[key]!r}; drop it from the sidecar dict"
            )
    meta = {**dict(sidecar), **owned}
    meta.update(input_name=INPUT_NAME, output_name=OUTPUT_NAME, medtune_version=__version__)
    return validate_sidecar(meta, "export sidecar")


def _as_uint8_images(inputs: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    arr = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or len(arr) == 0:
        raise MedtuneError(
            f"parity inputs must be N x {size} x {size} x 3 uint8 images (N >= 1); "
            f"got {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8:
        raise MedtuneError(f"parity inputs must be uint8 images, got dtype {arr.dtype}")
    return arr


@contextlib.contextmanager
def _cpu_eval_copy(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on CPU (a copy when it lives elsewhere); training mode restored."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    net = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


# ---------------------------------------------------------------------------------------------
# exporters
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _example_batch(x: np.ndarray) -> np.ndarray:
    """Two real images to export with (batch 1 could be specialised into the graph)."""
    return x[:2] if len(x) >= 2 else np.repeat(x[:1], 2, axis=0)


def _export_onnx(net: nn.Module, path: Path, x: np.ndarray, opset: int, which: str) -> str:
    """Write ONNX to ``path``; returns the exporter used (``legacy`` or ``dynamo``)."""
    example = torch.from_numpy(x)
    errors: list[str] = []
    order = ["legacy", "dynamo"] if which == "auto" else [which]
    for name in order:
        if name == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            errors.append("dynamo: needs the 'onnxscript' package (pip install onnxscript)")
            continue
        try:
            with _quiet(), torch.no_grad():
                _EXPORTERS[name](net, example, path, opset)
            return name
        except Exception as exc:  # exporter failures come in many types
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    raise MedtuneError(f"ONNX export failed ({'; '.join(errors)})")


def _output_names(net: nn.Module) -> list[str]:
    return [OUTPUT_NAME, FEATURES_NAME] if isinstance(net, LogitsAndFeatures) else [OUTPUT_NAME]


def _legacy_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    outputs = _output_names(net)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
    )


def _dynamo_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        verbose=False,
        opset_version=max(opset, 18),
        input_names=[INPUT_NAME],
        output_names=_output_names(net),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    program.save(str(path), external_data=False)


_EXPORTERS = {"legacy": _legacy_onnx, "dynamo": _dynamo_onnx}


def _check_onnx(path: Path, opset: int, features: bool = False) -> int:
    """``onnx.checker`` plus medtune's I/O contract (names, dynamic batch); returns the opset."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise MedtuneError(f"exported ONNX fails onnx.checker ({exc})") from exc
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    expected = [OUTPUT_NAME, FEATURES_NAME] if features else [OUTPUT_NAME]
    if inputs[:1] != [INPUT_NAME] or outputs != expected:
        raise MedtuneError(
            f"exported ONNX has inputs {inputs} / outputs {outputs}, expected "
            f"'{INPUT_NAME}' / {expected}"
        )
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise MedtuneError("exported ONNX has a fixed batch size; expected a dynamic batch axis")
    onnx_opset = max(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0
    )
    if onnx_opset < opset:
        raise MedtuneError(f"exported ONNX uses opset {onnx_opset}, expected >= {opset}")
    return int(onnx_opset)


def _export_torchscript(net: nn.Module, path: Path, x: np.ndarray) -> None:
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(net, torch.from_numpy(x), check_trace=False)
        except Exception as exc:
            raise MedtuneError(f"TorchScript tracing failed ({exc}); try --format onnx") from exc
        torch.jit.save(traced, str(path))


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------


def _torch_logits(net: nn.Module, x: np.ndarray) -> np.ndarray:
    step = PARITY_BATCH
    with torch.no_grad():
        outs = [net(torch.from_numpy(x[i : i + step])) for i in range(0, len(x), step)]
    return torch.cat(outs).float().numpy()


def _onnx_logits(path: Path, meta: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Run the exported file through the deployment predictor (same preprocessing code).

    Also runs the first image alone, so a batch size other than the traced one is exercised.
    """
    pred = OnnxPredictor(path, sidecar=meta, batch_size=PARITY_BATCH)
    batch = pred.logits(images)
    single = pred.logits(images[:1])
    if not np.allclose(single, batch[:1], rtol=0, atol=1e-4):
        gap = float(np.abs(single - batch[:1]).max())
        raise MedtuneError(f"exported ONNX gives batch-dependent outputs (gap {gap:.3g})")
    return batch


def _torchscript_logits(path: Path, x: np.ndarray) -> np.ndarray:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    return _torch_logits(loaded, x)


def _parity(ref: np.ndarray, got: np.ndarray, temperature: float) -> tuple[float, float]:
    """(max abs probability difference, max abs logit difference)."""
    if ref.shape != got.shape:
        raise MedtuneError(f"exported model gives shape {got.shape}, PyTorch gives {ref.shape}")
    p_diff = np.abs(apply_temperature(ref, temperature) - apply_temperature(got, temperature)).max()
    l_diff = np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()
    return float(p_diff), float(l_diff)
