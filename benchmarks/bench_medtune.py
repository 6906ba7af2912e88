"""medtune as a user runs it: ``medtune.train(...)`` with its defaults, then its inference path.

The only addition is a Lightning callback that timestamps every epoch (how long training and
validation took, the validation QWK); it is attached by wrapping ``lightning.Trainer`` so that
medtune's code runs unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import Clock, Spec, median_time, qwk, say

IMPORTS = ("medtune.workflows.train", "medtune.engines.finetune", "medtune.engines.probe")


def _epoch_timer(clock: Clock, log: list[dict[str, Any]]):
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        """Per epoch: training seconds, images, validation seconds and QWK, end timestamp."""

        def on_train_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
            self.t_train, self.n, self.t_val = clock.now(), 0, None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.n += int(batch[0].shape[0])

        def on_validation_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
            self.t_val = clock.now()

        def on_train_epoch_end(self, trainer, module) -> None:  # noqa: ANN001
            end = clock.now()
            t_val = self.t_val if self.t_val is not None else end
            value = trainer.callback_metrics.get("val_qwk")
            log.append(
                {
                    "epoch": trainer.current_epoch,
                    "phase": "full",
                    "train_s": t_val - self.t_train,
                    "images": self.n,
                    "val_s": end - t_val,
                    "val_qwk": float(value) if value is not None else None,
                    "t_end": end,
                }
            )
            say(f"medtune epoch {trainer.current_epoch}: {log[-1]['train_s']:.1f} s, qwk {value}")

    return EpochTimer()


def _attach_timer(callback) -> None:  # noqa: ANN001
    """Every ``lightning.Trainer`` built from now on gets ``callback`` as well."""
    import lightning.pytorch as pl

    original = pl.Trainer.__init__

    def init(self, *args, callbacks=None, **kwargs) -> None:  # noqa: ANN001
        original(self, *args, callbacks=[*(callbacks or []), callback], **kwargs)

    pl.Trainer.__init__ = init


def _val_qwk(run_dir: Path) -> float:
    with np.load(run_dir / "val_logits.npz") as npz:
        return qwk(npz["labels"], npz["logits_none"].argmax(1))


def _train(spec: Spec, strategy: str, name: str) -> tuple[Any, float]:
    import medtune.workflows.train as run

    work = Path(spec.work)
    out, cache = work / f"medtune-{name}", work / f"cache-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)  # cold: the prepared cache is built in the timing
    result = run.train(
        data=spec.train_dir,
        val_data=spec.val_dir,
        test_fraction=0.0,
        out=str(out),
        cache_dir=str(cache),
        strategy=strategy,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        image_size=spec.image_size,
        seed=spec.seed,
        progress=False,
    )
    return result, _val_qwk(out)


def finetune(spec: Spec) -> dict[str, Any]:
    clock = Clock()
    log: list[dict[str, Any]] = []
    _attach_timer(_epoch_timer(clock, log))
    result, best_qwk = _train(spec, "finetune", "finetune")
    return {
        "epochs": log,
        "total_s": clock.now(),
        "final_val_qwk": log[-1]["val_qwk"],
        "restored_best_val_qwk": best_qwk,
        "settings": {k: result.config.to_dict()[k] for k in _SETTINGS},
    }


_SETTINGS = ("precision", "channels_last", "num_workers", "optimizer", "lr", "rot90", "batch_size")


def probe(spec: Spec) -> dict[str, Any]:
    clock = Clock()
    _, val_qwk = _train(spec, "linear-probe", "probe")
    return {"total_s": clock.now(), "val_qwk": val_qwk}


def infer(spec: Spec) -> dict[str, Any]:
    """Feature extraction on a prepared cache (what the probes do); ``medtune.workflows.predict``
    from image files with the fine-tuned run; and the model alone on prepared images."""
    from medtune.data import load_imageset, prepare
    from medtune.deploy.engine import run_scorer
    from medtune.models import create_backbone
    from medtune.runs import RunFolder
    from medtune.transfer.features import TOP, extract_features
    from medtune.workflows.predict import predict

    work, run = Path(spec.work), Path(spec.work) / "medtune-finetune"
    images = load_imageset(spec.val_dir)
    n = len(images)
    shutil.rmtree(work / "cache-infer", ignore_errors=True)
    cache = prepare(images, spec.image_size, {"crop": True}, work / "cache-infer", progress=False)
    backbone = create_backbone("efficientnet_lite0")
    runs = iter(range(1000))

    def features() -> np.ndarray:
        tag = f"bench-{next(runs)}"  # a new feature folder each time: really computed
        out = extract_features(
            backbone,
            cache,
            [TOP],
            model_id=tag,
            batch_size=max(spec.batch_size, 32),
            progress=False,
        )
        return out[(TOP, 0)]

    say("medtune features")
    feat_s, _ = median_time(features, spec.repeats)
    say("medtune predict (image files -> decoded grades)")
    predict_s, rows = median_time(
        lambda: predict([spec.val_dir], run=run, progress=False), spec.repeats
    )
    labels = [int(Path(r["image"]).parent.name) for r in rows]
    scorer = run_scorer(RunFolder(run))

    def logits() -> np.ndarray:  # the engine predict runs (RUN/model.onnx), on prepared images
        return scorer.logits(np.asarray(cache.images[0:n]))

    model_s, out = median_time(logits, spec.repeats)
    return {
        "n_images": n,
        "features_images_per_s": n / feat_s,
        "predict_images_per_s": len(rows) / predict_s,
        "predict_qwk": qwk(labels, [r["grade"] for r in rows]),
        "predict_model_only_images_per_s": n / model_s,
        "model_only_argmax_qwk": qwk(images.labels, out.argmax(1)),
    }


TASKS = {"finetune": finetune, "probe": probe, "infer": infer}
