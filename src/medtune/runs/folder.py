"""The run folder: the one module that knows every file of a run, reads it and writes it.

Layout (``FORMAT_VERSION`` 3: the model card of format version 3)::

    RUN/config.yaml          fully resolved settings (``medtune train --config RUN/config.yaml``)
    RUN/splits.csv           image,split (train/val/test), reused by every later command
    RUN/checkpoints/         best.ckpt and last.ckpt (fine-tuning; Lightning format)
    RUN/logs/                metrics.csv (Lightning CSV log) and tensorboard/ (fine-tuning)
    RUN/model.safetensors    the deployable model's weights (tensors only: loading runs no code)
    RUN/model.json           how to rebuild, feed and read it: the model card
                             (:class:`medtune.evaluation.card.ModelCard`)
    RUN/model.onnx           the same model as an fp32 ONNX graph, what scores every image after
                             training (:mod:`medtune.deploy.engine`; the weights' SHA-256 inside)
    RUN/metrics.json         {"val": {...}, "test": {...}, "model": {...}}
    RUN/val_logits.npz       validation labels and logits (plain and per TTA mode)
    RUN/probe.json           the probe's stage and L2 choice (scenarios 1 and 3)
    RUN/advice.json          the advisor's evidence (``--strategy auto``)
    RUN/skipped_images.csv   unreadable images left out (``--skip-bad``)
    RUN/site_shift.npz       the site-shift model: training features' distribution, threshold
    RUN/batch_shift.npz      the batch shift test's references: validation features, probabilities
    RUN/suggested.csv        images a grader should label first (``medtune adapt --suggest``)
    RUN/adaptation.json      what ``medtune adapt`` changed (a run adapted to a new site)
    RUN/eval/<name>/         one ``medtune evaluate`` each: metrics.json, quality.json (with
                             ``--quality``), and the report (report.html, summary.md and
                             MODEL_CARD.md, :func:`medtune.evaluation.report.write_report`)
    RUN/debug/               train_positions_rank<r>.txt (``MEDTUNE_RECORD_SAMPLES=1``)
    RUN/export/              ``medtune export``'s default destination (model.onnx, model.json)

``model.json`` is read and written by :mod:`medtune.evaluation.card` only (the same format as an
export's card, format version 3); version 1 (``input_size``, medtune 0.1) and version 2 (flat
``ModelMeta``) files are read unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune.config import TrainConfig
from medtune.errors import MedtuneError
from medtune.evaluation.card import CARD_FILE, ModelCard, read_card, write_card
from medtune.io import atomic_path, write_json, write_yaml

if TYPE_CHECKING:
    from torch import nn

    from medtune.evaluation.shift import BatchShiftTest, SiteShiftModel

FORMAT_VERSION = 3
#: Settings added after runs were first written, with the value those older runs trained with
#: (their ``config.yaml`` lacks the key): resuming or re-reading them must not change them.
SETTINGS_BEFORE_THEY_EXISTED: dict[str, Any] = {"augment": [], "ema": None}


def _paths(config: TrainConfig) -> dict[str, str | list[str]]:
    """The config's data and cache paths that are set (``data`` may be a list of sites)."""
    names = ("data", "val_data", "test_data", "cache_dir")
    return {n: getattr(config, n) for n in names if getattr(config, n)}


def _each(value: str | list[str], fn: Any) -> str | list[str]:
    """``fn`` applied to a path or to every path of a list."""
    return [fn(v) for v in value] if isinstance(value, list) else fn(value)


@dataclass(frozen=True)
class RunFolder:
    """Paths, readers and writers of every file of one run folder (module docstring).

    Parameters
    ----------
    dir : pathlib.Path
        The run folder. Nothing is written outside it.
    """

    dir: Path

    CONFIG = "config.yaml"
    SPLITS = "splits.csv"
    MODEL_WEIGHTS = "model.safetensors"
    MODEL_META = CARD_FILE
    ENGINE = "model.onnx"
    METRICS = "metrics.json"
    VAL_LOGITS = "val_logits.npz"
    PROBE = "probe.json"
    ADVICE = "advice.json"
    SKIPPED = "skipped_images.csv"
    SITE_SHIFT = "site_shift.npz"
    BATCH_SHIFT = "batch_shift.npz"
    SUGGESTED = "suggested.csv"
    ADAPTATION = "adaptation.json"
    PREPARE_LOCK = ".prepare.lock"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    EVAL = "eval"
    EVAL_METRICS = "metrics.json"
    EVAL_QUALITY = "quality.json"
    EXPORT = "export"
    DEBUG = "debug"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> Path:
        """``RUN/name`` for one of the file names above."""
        return self.dir / name

    @property
    def config_path(self) -> Path:
        return self.dir / self.CONFIG

    @property
    def weights_path(self) -> Path:
        """``model.safetensors``: the deployable model's weights."""
        return self.dir / self.MODEL_WEIGHTS

    @property
    def card_path(self) -> Path:
        """``model.json``: the model card."""
        return self.dir / self.MODEL_META

    @property
    def metrics_path(self) -> Path:
        """``metrics.json``: the figures written when the run finished."""
        return self.dir / self.METRICS

    @property
    def export_dir(self) -> Path:
        """``RUN/export``: where ``medtune export`` writes unless told otherwise."""
        return self.dir / self.EXPORT

    @property
    def debug_dir(self) -> Path:
        """``RUN/debug``: debugging aids (``MEDTUNE_RECORD_SAMPLES=1``)."""
        return self.dir / self.DEBUG

    @property
    def splits_path(self) -> Path:
        return self.dir / self.SPLITS

    @property
    def checkpoints(self) -> Path:
        return self.dir / self.CHECKPOINTS

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def training_log(self) -> Path:
        """Lightning's per-step/epoch CSV log (fine-tuning runs only)."""
        return self.dir / self.LOGS / "metrics.csv"

    def eval_dir(self, name: str) -> Path:
        """``RUN/eval/<name>``; ``name`` must be a plain folder name."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise MedtuneError(f"{name!r}: an evaluation name must be a plain folder name")
        return self.dir / self.EVAL / name

    def write_eval_metrics(self, name: str, metrics: dict[str, Any]) -> Path:
        """Write ``RUN/eval/<name>/metrics.json`` (atomically); returns its path."""
        path = self.eval_dir(name) / self.EVAL_METRICS
        write_json(path, metrics)
        return path

    def write_eval_quality(self, name: str, summary: dict[str, Any]) -> Path:
        """Write ``RUN/eval/<name>/quality.json`` (``evaluate --quality``); returns its path."""
        path = self.eval_dir(name) / self.EVAL_QUALITY
        write_json(path, summary)
        return path

    def latest_eval_metrics(self) -> tuple[str, dict[str, Any]] | None:
        """The newest readable ``RUN/eval/<name>/metrics.json`` as ``(name, metrics)``, or
        ``None`` when the run has no evaluation (or only unreadable ones)."""
        evals = sorted(
            (self.dir / self.EVAL).glob(f"*/{self.EVAL_METRICS}"), key=lambda p: p.stat().st_mtime
        )
        if evals:
            try:
                return evals[-1].parent.name, json.loads(evals[-1].read_text())
            except (OSError, ValueError):
                pass
        return None

    # ------------------------------------------------------------------ config
    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> TrainConfig:
        """The run's fully resolved settings, with its paths valid from here.

        ``config.yaml`` stores absolute paths and the run folder's own absolute path. A data
        path that no longer exists is looked up again at the same place relative to the run
        folder, so a run works from any directory and after being moved together with its data.

        Raises
        ------
        MedtuneError
            When the folder holds no ``config.yaml`` (not a run folder).
        """
        if not self.config_path.is_file():
            raise MedtuneError(
                f"{self.config_path}: not found; give a run folder written by medtune train"
            )
        # settings added since the run was written keep the value the run was trained with
        config = TrainConfig.load(self.config_path, absent=SETTINGS_BEFORE_THEY_EXISTED)
        here = self.dir.resolve()
        old = Path(config.out)
        moved = {
            k: _each(v, lambda p: self._relocated(p, old, here)) for k, v in _paths(config).items()
        }
        return dataclasses.replace(config, out=str(here), **moved)

    def write_config(self, config: TrainConfig) -> None:
        """Write ``config.yaml`` with absolute paths (see :meth:`read_config`)."""
        absolute = {k: _each(v, os.path.abspath) for k, v in _paths(config).items()}
        config = dataclasses.replace(config, out=str(self.dir.resolve()), **absolute)
        write_yaml(self.config_path, config.to_dict())

    @staticmethod
    def _relocated(path: str, old_run: Path, new_run: Path) -> str:
        if os.path.exists(path) or not old_run.is_absolute():
            return path
        candidate = os.path.normpath(new_run / os.path.relpath(path, old_run))
        return candidate if os.path.exists(candidate) else path

    # ------------------------------------------------------------------ model
    def read_card(self) -> ModelCard:
        """The deployable model's description (``model.json``).

        Raises
        ------
        MedtuneError
            When there is no trained model in the folder.
        """
        return read_card(
            self.dir / self.MODEL_META,
            missing="no trained model here; give a run folder written by medtune train",
        )

    def write_card(self, card: ModelCard) -> None:
        write_card(self.dir / self.MODEL_META, card)

    def update_card(self, **changes: Any) -> ModelCard:
        """Rewrite ``model.json`` with some fields changed; return the new description."""
        card = self.read_card().replace(**changes)
        self.write_card(card)
        return card

    def write_model(self, model: nn.Module, card: ModelCard) -> None:
        """Write ``model.safetensors`` then ``model.json``, each atomically."""
        from safetensors.torch import save_file

        # GoogLeNet's auxiliary heads only help training; the deployed model never runs them.
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("aux_heads.")
        }
        with atomic_path(self.dir / self.MODEL_WEIGHTS) as tmp:
            save_file(state, str(tmp))
        self.write_card(card)

    def load_model(self) -> tuple[nn.Module, ModelCard]:
        """Rebuild the trained model in eval mode (no pretrained download needed).

        Returns
        -------
        model : torch.nn.Module
            A :class:`~medtune.models.TransferModel` or a ``StageProbeClassifier``.
        card : ModelCard

        Raises
        ------
        MedtuneError
            When the folder holds no trained model.
        """
        from safetensors.torch import load_file

        from medtune.models import build_model

        card = self.read_card()
        if card.backbone is None or card.kind is None:
            raise MedtuneError(
                f"{self.dir / self.MODEL_META}: names no backbone or model kind; it is an "
                "export's card, not a run's: give the run folder"
            )
        model = build_model(
            card.backbone,
            card.kind,
            card.num_classes,
            stage=card.stage,
            dropout=card.dropout,
        )
        model.load_state_dict(load_file(str(self.dir / self.MODEL_WEIGHTS)))
        return model.eval(), card

    # ------------------------------------------------------------------ results
    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_path, metrics)

    def read_metrics(self) -> dict[str, Any]:
        path = self.metrics_path
        if not path.is_file():
            raise MedtuneError(f"{path}: not found; the run has not finished")
        return json.loads(path.read_text(encoding="utf-8"))

    def write_val_logits(
        self,
        labels: np.ndarray,
        logits: dict[str, np.ndarray],
        sites: list[str] | None = None,
    ) -> None:
        """Validation labels (N,) and logits (N, K) per TTA mode, for later operating points,
        and the site of each image (``sites``, when the run has several: the worst-site rule of
        :func:`medtune.evaluation.operating_points.choose_operating_points`)."""
        extra = {} if sites is None else {"sites": np.asarray(sites, dtype=str)}
        with atomic_path(self.dir / self.VAL_LOGITS) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, labels=labels, **extra, **{f"logits_{k}": v for k, v in logits.items()})

    def read_val_logits(self) -> dict[str, np.ndarray]:
        """``{"labels": (N,), "logits_<tta>": (N, K), ...}`` and ``"sites"`` (N,) when written
        (no pickles are loaded)."""
        path = self.dir / self.VAL_LOGITS
        if not path.is_file():
            raise MedtuneError(f"{path}: not found; the run has not finished")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def write_probe_report(self, report: dict[str, Any]) -> None:
        write_json(self.dir / self.PROBE, report)

    # ------------------------------------------------------------------ site shift, adaptation
    def write_site_shift(self, model: SiteShiftModel) -> None:
        """Save the site-shift model (:class:`medtune.evaluation.shift.SiteShiftModel`)."""
        model.save(self.dir / self.SITE_SHIFT)

    def read_site_shift(self) -> SiteShiftModel | None:
        """The run's site-shift model, or ``None`` for a run without one (older runs, adapted
        runs).

        Raises
        ------
        MedtuneError
            When the file exists but cannot be read.
        """
        from medtune.evaluation.shift import SiteShiftModel

        path = self.dir / self.SITE_SHIFT
        return SiteShiftModel.load(path) if path.is_file() else None

    def write_batch_shift(self, test: BatchShiftTest) -> None:
        """Save the batch shift test (:class:`medtune.evaluation.shift.BatchShiftTest`)."""
        test.save(self.dir / self.BATCH_SHIFT)

    def read_batch_shift(self) -> BatchShiftTest | None:
        """The run's batch shift test, or ``None`` for a run without one (older runs).

        Raises
        ------
        MedtuneError
            When the file exists but cannot be read.
        """
        from medtune.evaluation.shift import BatchShiftTest

        path = self.dir / self.BATCH_SHIFT
        return BatchShiftTest.load(path) if path.is_file() else None

    def write_adaptation(self, record: dict[str, Any]) -> None:
        write_json(self.dir / self.ADAPTATION, record)

    def read_adaptation(self) -> dict[str, Any] | None:
        """``adaptation.json`` of a run made by ``medtune adapt``, else ``None``."""
        path = self.dir / self.ADAPTATION
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
