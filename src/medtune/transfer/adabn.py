"""AdaBN: re-estimate BatchNorm statistics on unlabelled images of a new site.

Adaptive Batch Normalization (Li et al. 2016, "Revisiting batch normalization for practical
domain adaptation") replaces the running mean and variance of BatchNorm layers by those of the
target domain's images and changes nothing else. Here only the layers that fine-tuning
re-estimated are adapted: BatchNorm layers in frozen stages keep their ImageNet statistics, since
re-estimating those too costs the home site accuracy (measured on APTOS -> EyePACS, see
``findings.md``). Linear-probe runs, whose whole backbone is frozen, have nothing to adapt.

The statistics are cumulative averages over the given batches (PyTorch's ``momentum=None``):
each batch weighs the same, so give batches of equal size (a smaller last batch counts as much
as a full one). As in the paper's practice, each layer sees its inputs normalised by the upstream
layers' batch statistics of the same forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtune.errors import MedtuneError

__all__ = ["adabn", "adaptable_norms"]


def _frozen_names(stages: Sequence[Any], frozen_stages: int | Iterable[str]) -> list[str]:
    """Names of the frozen stages, from a leading count (like ``--freeze``) or names."""
    names = [stage.name for stage in stages]
    if isinstance(frozen_stages, int):
        if not 0 <= frozen_stages <= len(names):
            raise MedtuneError(
                f"frozen_stages must be between 0 and {len(names)} (the model's stage count), "
                f"got {frozen_stages}"
            )
        return names[:frozen_stages]
    chosen = list(frozen_stages)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise MedtuneError(f"unknown stage(s) {unknown}; the model's stages are {names}")
    return chosen


def _in_stage(path: str, modules: Iterable[str]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in modules)


def adaptable_norms(
    model: nn.Module, frozen_stages: int | Iterable[str]
) -> tuple[dict[str, _BatchNorm], dict[str, _BatchNorm]]:
    """BatchNorm layers of ``model.backbone`` split into (adapted, kept) by stage.

    Parameters
    ----------
    model : medtune.models.TransferModel
        Anything with ``backbone`` (the feature extractor) and ``stages`` (its stage map).
    frozen_stages : int or iterable of str
        The number of leading stages that were frozen during fine-tuning (the recipe's
        ``freeze``), or their names.

    Returns
    -------
    (dict, dict)
        ``{module path: layer}`` to adapt (outside the frozen stages) and to keep. Layers without
        running statistics (``track_running_stats=False``) are in neither.
    """
    frozen = set(_frozen_names(model.stages, frozen_stages))
    frozen_modules = [m for s in model.stages if s.name in frozen for m in s.modules]
    adapt: dict[str, _BatchNorm] = {}
    keep: dict[str, _BatchNorm] = {}
    for path, module in model.backbone.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            (keep if _in_stage(path, frozen_modules) else adapt)[path] = module
    return adapt, keep


def _stats(bn: _BatchNorm) -> list[Tensor | None]:
    return [None if t is None else t.clone() for t in _buffers(bn)]


def _buffers(bn: _BatchNorm) -> list[Tensor | None]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _restore(bn: _BatchNorm, saved: list[Tensor | None]) -> None:
    for tensor, value in zip(_buffers(bn), saved, strict=True):
        if tensor is not None and value is not None:
            tensor.copy_(value)


def _as_batch(batch: Any, device: torch.device) -> Tensor:
    if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
        batch = batch[0]
    x = torch.as_tensor(np.asarray(batch)) if not isinstance(batch, Tensor) else batch
    if x.ndim != 4 or x.shape[1] != 3:
        raise MedtuneError(
            f"AdaBN batches must be normalised images of shape (B, 3, H, W), got {tuple(x.shape)}"
        )
    return x.to(device=device, dtype=torch.float32)


@torch.no_grad()
def adabn(
    model: nn.Module,
    batches: Iterable[Any],
    frozen_stages: int | Iterable[str],
) -> dict[str, Any]:
    """Re-estimate the running statistics of the fine-tuned BatchNorm layers on new images.

    Only BatchNorm layers outside the frozen stages are re-estimated, by cumulative averaging
    (``momentum=None``) over ``batches`` in fp32 with autocast off and no gradient. The model
    runs in eval mode except those layers (dropout stays off); afterwards every module's
    train/eval mode and every layer's momentum are restored. Weights, biases, the head and the
    frozen layers' statistics are not touched.

    Parameters
    ----------
    model : medtune.models.TransferModel
        The fine-tuned model (fp32 weights), changed in place.
    batches : iterable of Tensor or ndarray, each (B, 3, H, W)
        Unlabelled images of the new site, prepared and normalised exactly as for prediction;
        ``(images, labels)`` tuples are accepted and the labels ignored. Equal batch sizes
        give every image the same weight.
    frozen_stages : int or iterable of str
        Stages frozen during fine-tuning: a leading count (``TrainConfig.freeze``) or names.

    Returns
    -------
    dict
        ``layers_adapted``, ``layers_kept`` (frozen-stage BatchNorm layers), ``images``,
        ``batches``, ``frozen_stages`` (names) and ``method``.

    Raises
    ------
    MedtuneError
        When no BatchNorm layer lies outside the frozen stages (e.g. a linear-probe run), when
        ``batches`` holds no image, or on a batch of the wrong shape.
    """
    adapt, keep = adaptable_norms(model, frozen_stages)
    if not adapt:
        raise MedtuneError(
            f"no BatchNorm layer outside the {len(keep)} in the frozen stages: nothing was "
            "re-estimated during fine-tuning, so AdaBN has nothing to adapt (a linear probe "
            "needs feature-level alignment instead)"
        )
    modes = {m: m.training for m in model.modules()}
    momenta = {path: bn.momentum for path, bn in adapt.items()}
    saved = {path: _stats(bn) for path, bn in adapt.items()}
    device = next(model.parameters()).device
    n_images = n_batches = 0
    try:
        model.eval()
        for bn in adapt.values():
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the batches
            bn.train()
        with torch.autocast(device_type=device.type, enabled=False):
            for batch in batches:
                x = _as_batch(batch, device)
                if len(x):
                    model(x)
                    n_images += len(x)
                    n_batches += 1
        if n_images == 0:
            raise MedtuneError("AdaBN got no images; pass batches of the new site's images")
    except BaseException:
        for path, bn in adapt.items():  # a failed adaptation leaves the model as it was
            _restore(bn, saved[path])
        raise
    finally:
        for path, bn in adapt.items():
            bn.momentum = momenta[path]
        for module, mode in modes.items():
            module.train(mode)
    frozen = _frozen_names(model.stages, frozen_stages)
    return {
        "method": "AdaBN (Li et al. 2016): BatchNorm running statistics re-estimated, fp32",
        "layers_adapted": len(adapt),
        "layers_kept": len(keep),
        "images": n_images,
        "batches": n_batches,
        "frozen_stages": frozen,
    }
