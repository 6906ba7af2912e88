"""Grad-CAM heatmaps via the maintained ``grad-cam`` package (``pytorch_grad_cam``).

No CAM arithmetic is written here: :class:`pytorch_grad_cam.GradCAM` computes the maps and
:func:`pytorch_grad_cam.utils.image.show_cam_on_image` blends them onto the images. This module
only prepares inputs (uint8 -> normalised tensor, with ``requires_grad`` so that maps exist even
when the backbone is frozen, e.g. a linear probe) and picks examples for the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medtune.config import InputSpec
from medtune.data.normalise import normalise_batch
from medtune.evaluation.inference import model_device

__all__ = ["gradcam_maps", "gradcam_overlays", "select_gradcam_examples"]


def _check_images(images_uint8: np.ndarray) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def gradcam_maps(
    model: nn.Module,
    target_layer: nn.Module,
    images_uint8: np.ndarray,
    spec: InputSpec,
    targets: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for ``targets`` (class indices; None: predicted class).

    ``images_uint8`` (N, H, W, 3) are fed as ``spec`` says (its normalisation)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = _check_images(images_uint8)
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"targets has {len(targets)} entries for {len(images)} images")
    dev = model_device(model)
    was_training = model.training
    maps: list[np.ndarray] = []
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            GradCAM(model=model, target_layers=[target_layer]) as cam,
        ):
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                x = normalise_batch(chunk.to(dev).permute(0, 3, 1, 2), spec.mean, spec.std)
                x = x.requires_grad_(True)
                tg = None
                if targets is not None:
                    tg = [ClassifierOutputTarget(int(t)) for t in targets[start : start + len(x)]]
                maps.append(np.asarray(cam(input_tensor=x, targets=tg), dtype=np.float32))
    finally:
        model.train(was_training)
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[1:3]), np.float32)


def gradcam_overlays(
    model: nn.Module,
    target_layer: nn.Module,
    images_uint8: np.ndarray,
    spec: InputSpec,
    targets: Sequence[int] | None = None,
    *,
    image_weight: float = 0.5,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Heatmap overlays: one uint8 (H, W, 3) RGB image per input image (N, H, W, 3) uint8.

    ``spec`` is how the model is fed (its normalisation); ``targets`` are the class indices to
    explain (None: each image's predicted class).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    images = _check_images(images_uint8)
    maps = gradcam_maps(model, target_layer, images, spec, targets, batch_size=batch_size)
    return [
        show_cam_on_image(
            img.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=image_weight
        )
        for img, cam in zip(images, maps, strict=True)
    ]


def select_gradcam_examples(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    pred: Sequence[int] | None = None,
    n_correct: int = 1,
    n_wrong: int = 1,
) -> list[tuple[int, str]]:
    """Pick, for each true class, the most confident correct and wrong predictions.

    Parameters
    ----------
    y_true : sequence of int, shape (N,)
        True classes.
    probs : ndarray, shape (N, K)
        Calibrated probabilities.
    class_names : sequence of str
        Names shown in captions (pass grade names).
    pred : sequence of int, optional
        Decoded classes (default: the argmax of ``probs``; pass the decoded labels when using a
        decoding).
    n_correct, n_wrong : int, default 1
        Examples per true class.

    Returns
    -------
    list of (int, str)
        ``(index, caption)`` with captions from :func:`plots.prediction_caption`, e.g.
        ``"predicted: Moderate NPDR, P = 0.62\ntrue: Severe NPDR"`` (P: the calibrated
        probability of the predicted class).
    """
    from medtune.evaluation.plots import prediction_caption

    y = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    yhat = probs.argmax(axis=1) if pred is None else np.asarray(pred).astype(np.int64)
    conf = probs[np.arange(len(y)), yhat]
    out: list[tuple[int, str]] = []
    for k in range(len(class_names)):
        for is_correct, limit in ((True, n_correct), (False, n_wrong)):
            idx = np.flatnonzero((y == k) & ((yhat == y) == is_correct))
            for i in idx[np.argsort(-conf[idx], kind="stable")][:limit]:
                caption = prediction_caption(
                    class_names[yhat[i]], float(conf[i]), class_names[y[i]]
                )
                out.append((int(i), caption))
    return out
