"""Export a trained classifier to ONNX or TorchScript with a JSON sidecar and a parity check.

The model takes normalised float32 NCHW RGB and returns logits. Given the run's site-shift model
or its batch shift test, an ONNX export also returns ``features`` (the pooled features the head
sees, checked against PyTorch's) and writes ``site_shift.npz`` and ``batch_shift.npz`` beside
it, so deployed predictions carry the same per-image site-shift score and the same batch verdict
as ``predict --run``. The export is written to a temp name, checked (``onnx.checker`` for ONNX)
and compared with PyTorch on the caller's real images;
only when the probabilities agree within ``tolerance`` is it renamed to ``model.onnx`` /
``model.ts`` and the model card ``model.json`` written: the run's
:class:`~medtune.evaluation.card.ModelCard` with its export-only facts (format, file, graph
names, opset, exporter, parity) in its ``export`` block (:func:`export_card`). A failed check
raises :class:`MedtuneError` and leaves no model file behind.

ONNX export uses the TorchScript-based exporter (``dynamo=False``: no extra packages, dynamic
batch via ``dynamic_axes``) and falls back to the dynamo exporter (needs ``onnxscript``) when the
legacy one is missing or fails; ``onnx_exporter`` forces either.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
)
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.card import ExportInfo, ModelCard, SiteShiftRef, write_card
from medtune.evaluation.inference import head_input
from medtune.evaluation.shift import BatchShiftTest, SiteShiftModel
from medtune.io import atomic_path
from medtune.runs.folder import RunFolder

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
ONNX_EXPORTERS = ("auto", "legacy", "dynamo")
MIN_OPSET = 17
PARITY_BATCH = 8
#: The batch shift test's file beside an export (the run folder's name for it).
BATCH_SHIFT_NAME = RunFolder.BATCH_SHIFT


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how closely the export matches PyTorch."""

    model_path: Path
    sidecar_path: Path
    fmt: str
    max_abs_diff: float  # max |p_torch - p_export| over parity images and classes
    max_abs_logit_diff: float
    n_parity_images: int
    card: ModelCard
    site_shift_path: Path | None = None
    batch_shift_path: Path | None = None


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    card: ModelCard,
    *,
    fmt: str = "onnx",
    parity_inputs: np.ndarray | torch.Tensor,
    tolerance: float = 1e-4,
    opset: int = MIN_OPSET,
    onnx_exporter: str = "auto",
    site_shift: SiteShiftModel | None = None,
    batch_shift: BatchShiftTest | None = None,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` (``model.onnx`` or ``model.ts`` + ``model.json``).

    Parameters
    ----------
    model : torch.nn.Module
        The trained model (exported from an eval-mode CPU copy; its mode is restored).
    out_dir : str or os.PathLike
        Receives the model file, its card ``model.json`` and, with ``site_shift``,
        ``site_shift.npz``.
    card : ModelCard
        The model's description (input spec, label space, temperature, decoding, operating
        points); the export adds its ``export`` block and, with ``site_shift``, the reference.
    fmt : {"onnx", "torchscript"}, default "onnx"
    parity_inputs : ndarray or Tensor, uint8, N x S x S x 3
        Real RGB images at the card's image size: the exported model's
        ``softmax(logits / temperature)`` must match PyTorch's within ``tolerance``.
    tolerance : float, default 1e-4
    opset : int, default 17
    onnx_exporter : {"auto", "legacy", "dynamo"}, default "auto"
    site_shift : SiteShiftModel, optional
        ONNX only; the model needs a ``head``: the graph gets a second output ``features``
        (checked against PyTorch too) and ``site_shift.npz`` is written beside it.
    batch_shift : BatchShiftTest, optional
        ONNX only; as ``site_shift`` (the test reads the same ``features`` output):
        ``batch_shift.npz`` is written beside the model and named in the card's ``export``
        block, so ``predict --model`` tests a batch as ``predict --run`` does.

    Returns
    -------
    ExportResult

    Raises
    ------
    MedtuneError
        For an unknown format, exporter or old opset, a card whose classes do not match the
        model's outputs, bad parity inputs, or a failed check (nothing is left behind).
    """
    if fmt not in FORMATS:
        raise MedtuneError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise MedtuneError(f"unknown ONNX exporter {onnx_exporter!r}; use {ONNX_EXPORTERS}")
    if opset < MIN_OPSET:
        raise MedtuneError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer")
    with_features = (site_shift is not None or batch_shift is not None) and fmt == "onnx"
    card = export_card(
        card,
        fmt,
        site_shift if fmt == "onnx" else None,
        batch_shift=batch_shift is not None and fmt == "onnx",
    )
    spec = card.input_spec
    images = _as_uint8_images(parity_inputs, spec.image_size)
    x = normalise_images(images, spec.mean, spec.std)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / FORMATS[fmt]
    with _cpu_eval_copy(model) as net:
        ref_logits = _torch_logits(net, x)
        if ref_logits.shape[1] != card.num_classes:
            raise MedtuneError(
                f"model has {ref_logits.shape[1]} outputs but the card lists "
                f"{card.num_classes} class names; pass matching class_names"
            )
        with atomic_path(model_path) as tmp:
            if fmt == "onnx":
                net = static_same_padding(net, spec.image_size)
                graph = LogitsAndFeatures(net).eval() if with_features else net
                used = _export_onnx(graph, tmp, _example_batch(x), opset, onnx_exporter)
                info = {"opset": _check_onnx(tmp, opset, with_features), "onnx_exporter": used}
                card = card.replace(export=dataclasses.replace(card.export, **info))
                exp_logits = _onnx_logits(tmp, card, images)
                if with_features:
                    _check_features(graph, tmp, card, images, x)
            else:
                _export_torchscript(net, tmp, _example_batch(x))
                exp_logits = _torchscript_logits(tmp, x)
            diff, logit_diff = _parity(ref_logits, exp_logits, card.temperature)
            if not diff <= tolerance:
                raise MedtuneError(
                    f"{model_path}: parity check failed: {fmt} probabilities differ from PyTorch "
                    f"by {diff:.3g} (max abs, tolerance {tolerance:g}) on {len(images)} images; "
                    "nothing was written; check for unsupported layers or retry another format"
                )
    parity = {
        "max_abs_diff": diff,
        "max_abs_logit_diff": logit_diff,
        "n_images": len(images),
        "tolerance": tolerance,
    }
    card = card.replace(export=dataclasses.replace(card.export, parity=parity))
    shift_path = site_shift.save(out / SITE_SHIFT_NAME) if card.site_shift else None
    batch_path = batch_shift.save(out / BATCH_SHIFT_NAME) if card.export.batch_shift else None
    sidecar_path = write_card(out / SIDECAR_NAME, card)
    return ExportResult(
        model_path, sidecar_path, fmt, diff, logit_diff, len(images), card, shift_path, batch_path
    )


def export_card(
    card: ModelCard,
    fmt: str,
    site_shift: SiteShiftModel | None,
    *,
    batch_shift: bool = False,
) -> ModelCard:
    """The card of an export: ``card`` checked (read back from its JSON form), with the export
    block (format, file, graph I/O names, medtune version, the batch shift test's file when
    ``batch_shift``) and the site-shift reference. Either needs the ``features`` output.

    Raises
    ------
    MedtuneError
        For an invalid card (e.g. wrong decoding thresholds) or an unknown format.
    """
    from medtune.version import __version__

    if fmt not in FORMATS:
        raise MedtuneError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    checked = card.checked()
    export = ExportInfo(
        format=fmt,
        model_file=FORMATS[fmt],
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        features_name=FEATURES_NAME if site_shift is not None or batch_shift else None,
        input_layout=INPUT_LAYOUT,
        medtune_version=__version__,
        batch_shift=BATCH_SHIFT_NAME if batch_shift else None,
    )
    ref = None
    if site_shift is not None:
        ref = SiteShiftRef(SITE_SHIFT_NAME, site_shift.to_dict(arrays=False))
    return checked.replace(export=export, site_shift=ref)


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


def _check_features(
    graph: nn.Module, path: Path, card: ModelCard, images: np.ndarray, x: np.ndarray
) -> None:
    """The exported ``features`` output must match PyTorch's (what the site-shift score and the
    batch shift test read)."""
    with torch.no_grad():
        ref = torch.cat(
            [
                graph(torch.from_numpy(x[i : i + PARITY_BATCH]))[1]
                for i in range(0, len(x), PARITY_BATCH)
            ]
        ).numpy()
    got = OnnxPredictor(path, card=card, batch_size=PARITY_BATCH).logits_and_features(images)[1]
    gap = float(np.abs(ref - got).max())
    if not gap <= 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise MedtuneError(
            f"{path.name}: exported features differ from PyTorch's by {gap:.3g}; nothing was "
            "written; export without the site-shift model and batch shift test (remove "
            "site_shift.npz and batch_shift.npz from a copy of the run) or retry another exporter"
        )


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _as_uint8_images(inputs: np.ndarray | torch.Tensor, image_size: int) -> np.ndarray:
    arr = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if arr.ndim != 4 or arr.shape[1:] != (image_size, image_size, 3) or len(arr) == 0:
        raise MedtuneError(
            f"parity inputs must be N x {image_size} x {image_size} x 3 uint8 images (N >= 1); "
            f"got {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8:
        raise MedtuneError(f"parity inputs must be uint8 images, got dtype {arr.dtype}")
    return arr


def static_same_padding(model: nn.Module, image_size: int) -> nn.Module:
    """``model`` with timm's dynamic "same" padding made static for ``image_size`` inputs.

    TensorFlow-ported weights (EfficientNet-Lite's stride-2 convolutions) use timm's
    ``Conv2dSame``, which computes its padding from the input's shape on every call; traced to
    ONNX that is a chain of Shape/Gather/Ceil/Pad nodes per convolution that ONNX Runtime cannot
    fold into the convolution. The input size of a deployed model is fixed (its card's), so each
    such layer becomes ``ZeroPad2d`` (the same asymmetric padding) + ``Conv2d`` with the same
    weights, which ONNX Runtime fuses: 1.3-1.45x the images/s of EfficientNet-Lite0 on a 2-core
    CPU, identical outputs (``benchmarks/engines.py``). timm offers this only when a model is
    built (``set_layer_config(exportable=True)``), not for a trained one, hence this swap.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode; not modified.
    image_size : int
        The input side in pixels.

    Returns
    -------
    torch.nn.Module
        ``model`` itself when it has no ``Conv2dSame`` layer, else a changed copy.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        return model
    net = copy.deepcopy(model)
    sides: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=name: sides.__setitem__(n, a[0].shape[-2:]))
        for name, m in net.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, (h, w) in sides.items():
        old = net.get_submodule(name)
        kh, kw = old.kernel_size
        ph = get_same_padding(int(h), kh, old.stride[0], old.dilation[0])
        pw = get_same_padding(int(w), kw, old.stride[1], old.dilation[1])
        conv = nn.Conv2d(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation,
            old.groups, old.bias is not None,
        )  # fmt: skip
        conv.load_state_dict(old.state_dict())
        pad = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent), leaf, nn.Sequential(pad, conv))
    return net.eval()


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


def _onnx_logits(path: Path, card: ModelCard, images: np.ndarray) -> np.ndarray:
    """Run the exported file through the deployment predictor (same preprocessing code).

    Also runs the first image alone, so a batch size other than the traced one is exercised.
    """
    pred = OnnxPredictor(path, card=card, batch_size=PARITY_BATCH)
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
