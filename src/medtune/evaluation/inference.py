"""Batched inference with optional test-time augmentation (TTA).

TTA views are the four ``torch.rot90`` rotations (``"rot90"``; :data:`medtune.config.TTA_MODES`
lists the modes every part of medtune accepts). The uint8 views
of a batch are made in one go, then normalised and run through the model one view (one
caller-sized batch) at a time: on a 2-core CPU a 4x larger batch was 1.2-1.9x slower per image
(``docs/performance.md``).

Aggregation: the LOGITS of the views are averaged (not the probabilities). Averaging logits
commutes with temperature scaling (``mean(z_v) / T == mean(z_v / T)``), so a temperature fitted on
TTA validation logits keeps its meaning, and the output stays a logit that ``softmax`` maps to
probabilities. Fundus photographs have no canonical orientation, so rotations are label-preserving.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medtune.config import TTA_MODES, InputSpec
from medtune.data.normalise import normalise_batch

if TYPE_CHECKING:
    from medtune.evaluation.card import ModelCard
    from medtune.evaluation.shift import SiteShiftModel

__all__ = [
    "TTA_MODES",
    "TorchScorer",
    "head_input",
    "predict_logits",
    "predict_logits_and_features",
    "tta_views",
]


def tta_views(x: torch.Tensor, tta: str) -> torch.Tensor:
    """Stack the TTA views of ``x`` (B, C, H, W) along the batch: (V * B, C, H, W), view-major."""
    if tta == "none":
        return x
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rot90 TTA needs square images, got {tuple(x.shape[-2:])}")
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _images(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"batches must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


def head_input(model: nn.Module) -> nn.Module:
    """The model's final linear layer (``model.head``), whose input is the pooled feature vector.

    Both :class:`~medtune.models.TransferModel` (backbone features, dropout off in eval mode)
    and :class:`~medtune.models.stage_classifier.StageProbeClassifier` (the probed stage's
    pooled activations) end in ``head``; what it receives is what the site-shift score measures.

    Raises
    ------
    ValueError
        When the model has no ``head`` module.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no head module to read the features from")
    return head


def predict_logits(
    model: nn.Module,
    batches: Iterable[Any],
    spec: InputSpec,
    *,
    tta: str = "none",
    bf16: bool = False,
    channels_last: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Logits (N, K) float32 for uint8 batches (B, 3, H, W) or ``(images, labels)`` tuples.

    Each batch is moved to the model's device as uint8, scaled to [0, 1] and normalised with
    ``spec.mean``/``spec.std`` (:class:`~medtune.config.InputSpec`, in [0, 1] units, as timm's
    data config gives them). The model runs in eval
    mode under ``torch.inference_mode()`` (its training flag is restored afterwards); ``bf16``
    enables bfloat16 autocast; ``channels_last`` converts the model and inputs to that memory
    format (the caller's model is converted in place). TTA logits are averaged (module doc).
    """
    logits, _ = _run(
        model, batches, spec, tta, bf16, channels_last, progress, device, features=False
    )
    return logits


def predict_logits_and_features(
    model: nn.Module,
    batches: Iterable[Any],
    spec: InputSpec,
    *,
    tta: str = "none",
    channels_last: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the pooled features the head sees, in one fp32 pass.

    The features are captured by a forward pre-hook on the model's head (:func:`head_input`):
    for a :class:`~medtune.models.TransferModel` that is ``model.backbone(x)``, for a
    ``StageProbeClassifier`` ``model.features(x)``. With TTA the features of the views are
    averaged like the logits; the head is linear, so the averaged features still map to the
    averaged logits. The site-shift score (:class:`medtune.evaluation.shift.SiteShiftModel`)
    is computed from these features.

    Parameters
    ----------
    model : torch.nn.Module
        A trained image-level model with a ``head``.
    batches : iterable of uint8 Tensor (B, 3, H, W) or ``(images, labels)`` tuples
        Prepared images (:func:`medtune.data.prepare_image` or a prepared cache).
    spec : InputSpec
        How the model is fed (its RGB normalisation, ``ModelCard.input_spec``).
    tta : {"none", "rot90"}, default "none"
        Test-time augmentation (module doc).
    channels_last : bool, default True
        Channels-last memory format.
    progress : bool, default False
        Show a progress bar.
    device : torch.device or str, optional
        Default: the model's device.

    Returns
    -------
    logits : ndarray, shape (N, K), float32
    features : ndarray, shape (N, D), float32
        D is the head's input width (1,280 for EfficientNet-Lite0's top features).

    Raises
    ------
    ValueError
        For batches of the wrong shape or type, an unknown ``tta``, no batches, or a model
        without a head.
    """
    logits, feats = _run(
        model, batches, spec, tta, False, channels_last, progress, device, features=True
    )
    assert feats is not None
    return logits, feats


def _run(model, batches, spec, tta, bf16, channels_last, progress, device, *, features):
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    captured: list[torch.Tensor] = []
    hook = None
    if features:
        hook = head_input(model).register_forward_pre_hook(
            lambda _module, args: captured.append(args[0].detach().float())
        )
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    outs: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress):
                x = _images(batch).to(dev, non_blocking=True)
                b = x.shape[0]
                views = []
                for view in tta_views(x, tta).split(b):  # uint8 views, normalised one at a time
                    view = normalise_batch(view, spec.mean, spec.std, channels_last=channels_last)
                    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
                        views.append(model(view))
                z = torch.stack(views).float().mean(dim=0)  # (views, b, K) -> (b, K)
                outs.append(z.cpu().numpy())
                if features:
                    feats.append(torch.stack(captured).mean(dim=0).flatten(1).cpu().numpy())
                    captured.clear()
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if not outs:
        raise ValueError("predict_logits: no batches")
    logits = np.concatenate(outs).astype(np.float32, copy=False)
    return logits, (np.concatenate(feats).astype(np.float32, copy=False) if features else None)


def uint8_batches(images: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, S, S) tensors of ``images`` (an (N, S, S, 3) array, or a sliceable view
    such as :attr:`medtune.data.Part.images`), ``batch_size`` rows at a time, in order."""
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size])
        yield torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)


class TorchScorer:
    """A PyTorch model as a :class:`~medtune.evaluation.scoring.Scorer`: fp32 (the deployment
    precision: ``predict --run`` and the exported ONNX model compute the same logits), eval
    mode, ``batch_size`` images per forward pass.

    Parameters
    ----------
    model : torch.nn.Module
        A trained image-level model with a ``head`` (put in eval mode).
    card : ModelCard
        Its description (the input spec feeds it).
    site_shift : SiteShiftModel, optional
        The run's site-shift model.
    batch_size : int, default 32
    progress : bool, default False
        Show a progress bar per pass.
    """

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        site_shift: SiteShiftModel | None = None,
        *,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        self.model = model.eval()
        self.card = card
        self.site_shift = site_shift
        self.batch_size, self.progress = int(batch_size), bool(progress)

    def logits(self, images: Any, tta: str = "none") -> np.ndarray:
        """Logits (N, K) float32 of uint8 images (N, S, S, 3), with ``tta``."""
        batches = uint8_batches(images, self.batch_size)
        spec = self.card.input_spec
        return predict_logits(self.model, batches, spec, tta=tta, progress=self.progress)

    def logits_and_features(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and the head's input features (N, D) of the plain images."""
        batches = uint8_batches(images, self.batch_size)
        spec = self.card.input_spec
        return predict_logits_and_features(self.model, batches, spec, progress=self.progress)
