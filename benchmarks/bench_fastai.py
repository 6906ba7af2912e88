"""fastai as its documentation shows it: ``ImageDataLoaders.from_folder`` with ``Resize`` and
``aug_transforms()``, ``vision_learner`` on a timm architecture, ``fine_tune(epochs)``, then
``learn.export`` / ``load_learner`` and ``get_preds`` on a ``test_dl`` for inference.

The timm architecture is ``tf_efficientnet_lite0`` (the network medtune's Lite0 is) and its
pretrained weights are medtune's, handed to timm as a local file (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from benchlib import Clock, Spec, image_files, median_time, qwk, say

ARCH = "tf_efficientnet_lite0"


IMPORTS = ("fastai.vision.all",)


def _timer(clock: Clock, log: list[dict[str, Any]]):
    from fastai.callback.core import Callback
    from fastai.torch_core import find_bs

    class EpochTimer(Callback):
        """Per epoch: phase (frozen body / full), training and validation seconds, QWK."""

        order = 60  # after the Recorder (50), so the epoch's metrics are computed

        def before_fit(self) -> None:
            self.fit_index = getattr(self, "fit_index", 0) + 1

        def before_train(self) -> None:
            self.t_train, self.n = clock.now(), 0

        def after_batch(self) -> None:
            if self.training:
                self.n += find_bs(self.yb)

        def before_validate(self) -> None:
            self.t_val = clock.now()

        def after_epoch(self) -> None:
            end = clock.now()
            kappa = float(self.learn.metrics[0].value)
            log.append(
                {
                    "epoch": len(log),
                    "phase": "frozen" if self.fit_index == 1 else "full",
                    "train_s": self.t_val - self.t_train,
                    "images": self.n,
                    "val_s": end - self.t_val,
                    "val_qwk": kappa,
                    "t_end": end,
                }
            )
            say(f"fastai epoch {len(log) - 1} ({log[-1]['phase']}): qwk {kappa:.3f}")

    return EpochTimer()


def _learner(spec: Spec):
    from fastai.vision.all import (
        CohenKappa,
        ImageDataLoaders,
        Resize,
        aug_transforms,
        vision_learner,
    )

    dls = ImageDataLoaders.from_folder(
        Path(spec.train_dir).parent,
        train="train",
        valid="val",
        item_tfms=Resize(spec.image_size),
        batch_tfms=aug_transforms(),
        bs=spec.batch_size,
        seed=spec.seed,
    )
    local = {"file": spec.weights_file, "hf_hub_id": None, "source": None}
    return vision_learner(
        dls,
        ARCH,
        metrics=CohenKappa(weights="quadratic"),
        pretrained=True,
        pretrained_cfg_overlay=local,
    )


def finetune(spec: Spec) -> dict[str, Any]:
    from fastai.torch_core import set_seed

    set_seed(spec.seed)
    clock = Clock()
    log: list[dict[str, Any]] = []
    learn = _learner(spec)
    timer = _timer(clock, log)
    learn.add_cb(timer)
    learn.fine_tune(spec.epochs)
    total = clock.now()
    learn.remove_cb(timer)
    learn.export(Path(spec.work) / "fastai-learner.pkl")
    frozen = [e for e in log if e["phase"] == "frozen"]
    return {
        "epochs": log,
        "total_s": total,
        "final_val_qwk": log[-1]["val_qwk"],
        "frozen_s": frozen[-1]["t_end"],
        "frozen_val_qwk": frozen[-1]["val_qwk"],
    }


def infer(spec: Spec) -> dict[str, Any]:
    """``get_preds`` on a ``test_dl`` of image files; features: the body's pooled output."""
    import torch
    from fastai.learner import load_learner

    learn = load_learner(Path(spec.work) / "fastai-learner.pkl")
    files = image_files(spec.val_dir)
    paths, labels = [p for p, _ in files], [y for _, y in files]

    def predict() -> np.ndarray:
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(paths))
        return preds.numpy()

    body = learn.model[0].eval()
    pool = torch.nn.AdaptiveAvgPool2d(1)

    def features() -> np.ndarray:
        out = []
        with torch.no_grad():
            for (xb,) in learn.dls.test_dl(paths):
                out.append(pool(body(xb)).flatten(1).numpy())
        return np.concatenate(out)

    say("fastai features")
    feat_s, _ = median_time(features, spec.repeats)
    say("fastai predict")
    predict_s, probs = median_time(predict, spec.repeats)
    vocab = [int(v) for v in learn.dls.vocab]
    return {
        "n_images": len(paths),
        "features_images_per_s": len(paths) / feat_s,
        "predict_images_per_s": len(paths) / predict_s,
        "predict_qwk": qwk(labels, np.asarray(vocab)[probs.argmax(1)]),
    }


TASKS = {"finetune": finetune, "infer": infer}
