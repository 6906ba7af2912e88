"""The description of a trained model: :class:`ModelCard`, and its ONE JSON reader and writer.

Design: everything needed to rebuild, feed and read a trained model is one value, ``ModelCard``:

* ``input_spec`` (:class:`medtune.config.InputSpec`): image size, mean/std, fundus options;
* ``label_space`` (:class:`medtune.evaluation.labels.LabelSpace`): classes, graded or not, the
  positive class, hence grade names and referral classes;
* ``temperature`` (Guo et al. 2017) and ``decoding`` (:func:`medtune.evaluation.decoding.decode`);
* ``operating_points`` (:class:`OperatingPoints`, typed): referral thresholds chosen on
  validation, per TTA mode;
* ``site_shift`` (:class:`SiteShiftRef`): the file of the site-shift model and its threshold;
* the network (``backbone``, ``kind``, ``stage``, ``dropout``), ``synthetic`` and
  ``provenance`` (medtune version, the run an adapted model came from);
* ``export`` (:class:`ExportInfo`): facts only an exported model has (format, file, graph I/O
  names, opset, exporter, parity figures), ``None`` in a run folder.

The same file format serves ``RUN/model.json`` (:class:`medtune.runs.RunFolder`) and the export
sidecar ``EXPORT/model.json`` (:mod:`medtune.deploy`): :meth:`ModelCard.to_dict` /
:func:`write_card` write it, :meth:`ModelCard.from_dict` / :func:`read_card` read it, nothing
else parses it. Format version 3 nests the export facts under ``export``; older files still load:
version 1 run folders (``input_size``), version 2 run folders (flat ``ModelMeta``) and sidecars
written before version 3 (export facts at the top level, any extra keys ignored).

Imports numpy, scipy and the standard library only: the torch-free ONNX predictor reads cards.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtune.config import InputSpec
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.decoding import decode, validate_decoding
from medtune.evaluation.labels import LabelSpace
from medtune.io import write_json

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT_VERSION",
    "ExportInfo",
    "ModelCard",
    "OperatingPoint",
    "OperatingPoints",
    "Provenance",
    "SiteShiftRef",
    "read_card",
    "write_card",
]

#: The card's file name, in a run folder and beside an exported model.
CARD_FILE = "model.json"
#: 1: ``input_size`` (medtune 0.1); 2: flat ``ModelMeta`` / flat sidecar; 3: this module.
CARD_FORMAT_VERSION = 3
#: Top-level keys of sidecars written before version 3 that now live under ``export``.
_LEGACY_EXPORT_KEYS = (
    "format",
    "model_file",
    "input_layout",
    "input_name",
    "output_name",
    "medtune_version",
    "opset",
    "onnx_exporter",
    "parity",
)


@dataclass(frozen=True)
class OperatingPoint:
    """One referral threshold chosen on validation, with its validation figures.

    Attributes
    ----------
    threshold : float
        Refer when P(referable) >= threshold.
    rule : str or None
        How it was chosen, in words.
    sensitivity, specificity : float or None
        On the validation images it was chosen on (in-sample).
    sensitivity_ci, specificity_ci : list of 2 floats or None
        95% Wilson intervals (clustered by patient when groups exist).
    val_sites : dict or None
        Sensitivity and specificity at each validation site, when the point was chosen to hold
        at the worst site (several sites).
    validated_threshold : float or None
        For a point moved without labels (``medtune adapt --recalibrate``): the validated
        threshold it was moved from.
    """

    threshold: float
    rule: str | None = None
    sensitivity: float | None = None
    sensitivity_ci: list[float] | None = None
    specificity: float | None = None
    specificity_ci: list[float] | None = None
    val_sites: dict[str, Any] | None = None
    validated_threshold: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OperatingPoint:
        """Read one stored point (``threshold`` required; other keys default to ``None``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The point as JSON values (keys that do not apply, ``None``, left out)."""
        return _without_unset(self, ("val_sites", "validated_threshold"))


@dataclass(frozen=True)
class OperatingPoints:
    """The referral thresholds chosen on VALIDATION, per TTA mode (``sens90``, ``sens97.5``,
    ``youden``; :func:`medtune.evaluation.operating_points.validated_operating_points`).

    Attributes
    ----------
    name : str
        What a referral means (``LabelSpace.referral_name``).
    positive_classes : tuple of int
        The classes whose summed probability is thresholded.
    score : str
        The score in words.
    n_val, n_val_positive : int
        Validation images and positives they were chosen on.
    points : dict
        ``{tta: {point name: OperatingPoint}}``.
    label_free : str or None
        The label-free method that moved the points to a new site (``medtune adapt
        --recalibrate``; :mod:`medtune.evaluation.label_free`), else ``None``.
    prevalence : float or None
        The prevalence that method assumed.
    validated, status : bool or None, str or None
        Whether the points are validated at the site the model serves, and why
        (:func:`medtune.evaluation.label_free.operating_point_status`; a run made by
        ``medtune adapt``), ``None`` elsewhere.
    """

    name: str
    positive_classes: tuple[int, ...]
    score: str
    n_val: int
    n_val_positive: int
    points: dict[str, dict[str, OperatingPoint]]
    label_free: str | None = None
    prevalence: float | None = None
    validated: bool | None = None
    status: str | None = None

    def at(self, tta: str, name: str) -> OperatingPoint | None:
        """The point ``name`` validated with test-time augmentation ``tta`` (or ``None``)."""
        return (self.points.get(tta) or {}).get(name)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OperatingPoints:
        points = {
            str(tta): {str(n): OperatingPoint.from_dict(p) for n, p in (named or {}).items()}
            for tta, named in (values.get("points") or {}).items()
        }
        return cls(
            name=str(values.get("name") or ""),
            positive_classes=tuple(int(k) for k in values.get("positive_classes") or ()),
            score=str(values.get("score") or ""),
            n_val=int(values.get("n_val") or 0),
            n_val_positive=int(values.get("n_val_positive") or 0),
            points=points,
            label_free=values.get("label_free"),
            prevalence=values.get("prevalence"),
            validated=values.get("validated"),
            status=values.get("status"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The points as JSON values (the adaptation keys only when set)."""
        out = _without_unset(self, ("label_free", "prevalence", "validated", "status"))
        out["positive_classes"] = list(self.positive_classes)
        out["points"] = {
            tta: {n: p.to_dict() for n, p in named.items()} for tta, named in self.points.items()
        }
        return out


@dataclass(frozen=True)
class SiteShiftRef:
    """Where a model's site-shift model lives and its scalars (threshold, percentile, counts).

    Attributes
    ----------
    file : str
        The ``.npz`` beside the card (:meth:`medtune.evaluation.shift.SiteShiftModel.save`).
    summary : dict
        :meth:`~medtune.evaluation.shift.SiteShiftModel.to_dict` without arrays.
    """

    file: str
    summary: dict[str, Any]

    @property
    def threshold(self) -> float:
        """Site-shift score above which an image lies outside the training distribution."""
        return float(self.summary["threshold"])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: object) -> SiteShiftRef:
        if not values.get("file") or "threshold" not in values:
            raise MedtuneError(f"{source}: 'site_shift' needs 'file' and 'threshold'; re-export")
        return cls(str(values["file"]), {k: v for k, v in values.items() if k != "file"})

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, **self.summary}


@dataclass(frozen=True)
class ExportInfo:
    """Facts only an exported model has (the ``export`` block of its card).

    Attributes
    ----------
    format : {"onnx", "torchscript"}
    model_file : str
        ``model.onnx`` or ``model.ts``, beside the card.
    input_name, output_name, features_name : str
        Graph input (N x 3 x S x S float32, normalised RGB), logits output (N x K) and, for an
        export with a site-shift model, the features output (N x D; else ``None``).
    input_layout : str
    medtune_version : str
        The medtune that exported it.
    opset : int or None
        ONNX opset (ONNX only).
    onnx_exporter : {"legacy", "dynamo"} or None
    parity : dict or None
        ``max_abs_diff`` (probabilities), ``max_abs_logit_diff``, ``n_images``, ``tolerance``.
    batch_shift : str or None
        The batch shift test's file beside the card
        (:meth:`medtune.evaluation.shift.BatchShiftTest.save`; it reads the ``features``
        output), ``None`` without one.
    """

    format: str
    model_file: str
    input_name: str = "image"
    output_name: str = "logits"
    features_name: str | None = None
    input_layout: str = "NCHW float32 RGB normalised"
    medtune_version: str | None = None
    opset: int | None = None
    onnx_exporter: str | None = None
    parity: dict[str, Any] | None = None
    batch_shift: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: object) -> ExportInfo:
        return _build(cls, values, source, "export block")

    def to_dict(self) -> dict[str, Any]:
        """The block as JSON values; ``batch_shift`` only when the export carries the test (a
        card without it reads as before)."""
        return _without_unset(self, ("batch_shift",))


@dataclass(frozen=True)
class Provenance:
    """Where a model comes from.

    Attributes
    ----------
    medtune_version : str or None
        The medtune that wrote the card (``None``: written before format version 3).
    adapted_from : str or None
        The source run of a run made by ``medtune adapt``.
    """

    medtune_version: str | None = None
    adapted_from: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and read a trained model (module docstring).

    Attributes
    ----------
    label_space : LabelSpace
        What the logits mean.
    input_spec : InputSpec
        How images are fed to it.
    backbone : str or None
        Backbone name as :func:`medtune.models.create_backbone` takes it (``None`` only in an
        export made from a bare module).
    kind : {"finetune", "probe"} or None
        A :class:`~medtune.models.TransferModel` or a ``StageProbeClassifier``.
    stage : str or None
        The probed stage of a layer probe (``None``: top features).
    dropout : float
        Dropout before the head (rebuilds the same module tree).
    temperature : float
        Temperature fitted on validation logits (Guo et al. 2017).
    decoding : dict
        How probabilities become a class (:func:`medtune.evaluation.decoding.decode`).
    operating_points : OperatingPoints or None
        Validated referral thresholds (``None``: no referral task, or an old run).
    site_shift : SiteShiftRef or None
        The site-shift model beside the card.
    synthetic : bool
        Trained on medtune's synthetic demo set.
    provenance : Provenance
    export : ExportInfo or None
        Set in an export's card only.
    """

    label_space: LabelSpace
    input_spec: InputSpec
    backbone: str | None = None
    kind: str | None = None
    stage: str | None = None
    dropout: float = 0.0
    temperature: float = 1.0
    decoding: dict[str, Any] = field(default_factory=lambda: {"method": "argmax"})
    operating_points: OperatingPoints | None = None
    site_shift: SiteShiftRef | None = None
    synthetic: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    export: ExportInfo | None = None

    # ------------------------------------------------------------------ views
    @property
    def class_names(self) -> list[str]:
        """Class names in logit order."""
        return list(self.label_space.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes, K."""
        return self.label_space.num_classes

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature)``, (N, K) float64."""
        return apply_temperature(logits, self.temperature)

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """Decoded class indices (N,) int64 of calibrated probabilities (N, K)."""
        return decode(probs, self.decoding)

    def replace(self, **changes: Any) -> ModelCard:
        """This card with some fields changed (:func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def checked(self, source: object = "model card") -> ModelCard:
        """This card as a reader sees it: its JSON form read back, with every check of
        :meth:`from_dict` (class names, input spec, temperature, decoding thresholds).

        Raises
        ------
        MedtuneError
            For an invalid field.
        """
        return ModelCard.from_dict(self.to_dict(), source)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The card as JSON values (format version :data:`CARD_FORMAT_VERSION`)."""
        from medtune.version import __version__

        spec = self.input_spec
        provenance = dataclasses.replace(
            self.provenance, medtune_version=self.provenance.medtune_version or __version__
        )
        return {
            "format_version": CARD_FORMAT_VERSION,
            "backbone": self.backbone,
            "kind": self.kind,
            "stage": self.stage,
            "dropout": float(self.dropout),
            **self.label_space.to_dict(),
            "image_size": int(spec.image_size),
            "mean": [float(v) for v in spec.mean],
            "std": [float(v) for v in spec.std],
            "fundus": dict(spec.fundus),
            "temperature": float(self.temperature),
            "decoding": dict(self.decoding),
            "operating_points": _dict_or_none(self.operating_points),
            "site_shift": _dict_or_none(self.site_shift),
            "synthetic": bool(self.synthetic),
            "provenance": dataclasses.asdict(provenance),
            "export": _dict_or_none(self.export),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: object = CARD_FILE) -> ModelCard:
        """Read a card of any format version (module docstring).

        Parameters
        ----------
        values : mapping
            The parsed JSON object.
        source : object, default "model.json"
            Named in error messages (the file).

        Returns
        -------
        ModelCard

        Raises
        ------
        MedtuneError
            For missing or invalid fields (class names, image size, mean/std, temperature,
            decoding), or unknown fields in a version 2 run folder or a version 3 card.
        """
        if not isinstance(values, Mapping):
            raise MedtuneError(f"{source}: a model card must be a JSON object; re-export it")
        values = _upgraded(dict(values), source)
        known = {f.name for f in dataclasses.fields(_Fields)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedtuneError(f"{source}: unknown field(s) {', '.join(unknown)}; is it newer?")
        return _card(values, source)


@dataclass(frozen=True)
class _Fields:
    """The JSON keys of a version 3 card (what :meth:`ModelCard.from_dict` accepts)."""

    format_version: int
    backbone: Any
    kind: Any
    stage: Any
    dropout: Any
    class_names: Any
    ordinal: Any
    positive_class: Any
    image_size: Any
    mean: Any
    std: Any
    fundus: Any
    temperature: Any
    decoding: Any
    operating_points: Any
    site_shift: Any
    synthetic: Any
    provenance: Any
    export: Any


def _without_unset(value: Any, optional: tuple[str, ...]) -> dict[str, Any]:
    """``value``'s fields in order, those named in ``optional`` only when not ``None`` (they
    apply to some models only; a card without them reads as before)."""
    return {
        f.name: getattr(value, f.name)
        for f in dataclasses.fields(value)
        if f.name not in optional or getattr(value, f.name) is not None
    }


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    """A part of the card as JSON values (its own ``to_dict`` when it has one)."""
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)


def _build(cls: Any, values: Mapping[str, Any], source: object, what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MedtuneError(f"{source}: unknown {what} field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as err:
        raise MedtuneError(f"{source}: incomplete {what} ({err})") from None


def _upgraded(values: dict[str, Any], source: object) -> dict[str, Any]:
    """A card of format version 1 or 2 (run folder or sidecar) in version 3's layout."""
    version = values.get("format_version")
    if version is not None and int(version) >= CARD_FORMAT_VERSION:
        return values
    if "input_size" in values:  # format version 1
        values["image_size"] = values.pop("input_size")
    legacy_sidecar = "format" in values or "model_file" in values
    if legacy_sidecar:
        export = {k: values.pop(k) for k in _LEGACY_EXPORT_KEYS if k in values}
        if values.get("site_shift"):
            export["features_name"] = "features"
        values = {
            k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(_Fields)}
        }
        values["export"] = export
        values.setdefault("ordinal", False)  # what the ONNX path assumed without the key
        values.setdefault("fundus", {"crop": False})  # likewise: no fundus preprocessing
    values["format_version"] = CARD_FORMAT_VERSION
    return values


def _card(values: dict[str, Any], source: object) -> ModelCard:
    """Check each field and build the card."""
    names = values.get("class_names")
    if not isinstance(names, list) or len(names) < 2:
        raise MedtuneError(f"{source}: 'class_names' must list at least two class names")
    ordinal = values.get("ordinal")
    graded = None if ordinal is None else bool(ordinal)
    try:
        label_space = LabelSpace.of(names, graded, values.get("positive_class"))
    except MedtuneError as err:
        raise MedtuneError(f"{source}: {err}") from None
    temperature = 1.0 if values.get("temperature") is None else float(values["temperature"])
    if not temperature > 0:
        raise MedtuneError(f"{source}: 'temperature' must be positive, got {temperature}")
    ops, shift, export = (values.get(k) for k in ("operating_points", "site_shift", "export"))
    return ModelCard(
        label_space=label_space,
        input_spec=_input_spec(values, source),
        backbone=values.get("backbone"),
        kind=values.get("kind"),
        stage=values.get("stage"),
        dropout=float(values.get("dropout") or 0.0),
        temperature=temperature,
        decoding=validate_decoding(values.get("decoding"), len(names), source),
        operating_points=OperatingPoints.from_dict(ops) if ops else None,
        site_shift=SiteShiftRef.from_dict(shift, source) if shift else None,
        synthetic=bool(values.get("synthetic", False)),
        provenance=_build(Provenance, values.get("provenance") or {}, source, "provenance"),
        export=ExportInfo.from_dict(export, source) if export else None,
    )


def _input_spec(values: Mapping[str, Any], source: object) -> InputSpec:
    size = values.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise MedtuneError(f"{source}: 'image_size' must be a positive integer")
    norm = {}
    for key in ("mean", "std"):
        vals = values.get(key)
        if not isinstance(vals, (list, tuple)) or len(vals) != 3:
            raise MedtuneError(f"{source}: '{key}' must hold 3 numbers (RGB)")
        norm[key] = tuple(float(v) for v in vals)
    if min(norm["std"]) <= 0:
        raise MedtuneError(f"{source}: 'std' values must be positive")
    fundus = values.get("fundus")
    return InputSpec(size, norm["mean"], norm["std"], dict(fundus or {"crop": False}))


def read_card(path: str | Path, missing: str = "re-export the model to write it") -> ModelCard:
    """Read a card file (``RUN/model.json`` or an export's ``model.json``).

    Parameters
    ----------
    path : str or pathlib.Path
    missing : str
        The fix named when the file does not exist.

    Returns
    -------
    ModelCard

    Raises
    ------
    MedtuneError
        When the file is missing, not JSON, or not a valid card (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"{path}: not found; {missing}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{path}: cannot parse the model card JSON ({exc}); re-export") from None
    return ModelCard.from_dict(values, source=path)


def write_card(path: str | Path, card: ModelCard) -> Path:
    """Write ``card`` as JSON to ``path`` atomically; returns the path."""
    write_json(path, card.to_dict())
    return Path(path)
