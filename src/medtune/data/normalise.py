"""Input normalisation, the one home of ``x = (pixel / 255 - mean) / std``.

Images travel as uint8 RGB until the last moment (the prepared cache, the loaders, TTA views);
this module turns them into what an ImageNet-pretrained network expects. Two twins compute the
same thing in the same order of operations: :func:`normalise_batch` on torch tensors (channels
first, any device) and :func:`normalise_images` on numpy arrays (channels last in, channels first
out) for the torch-free ONNX predictor. This module imports torch only inside
:func:`normalise_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune.errors import MedtuneError

if TYPE_CHECKING:
    import torch

__all__ = ["normalise_batch", "normalise_images"]


def normalise_batch(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """Normalise a batch of uint8 images for a pretrained network.

    Parameters
    ----------
    images : torch.Tensor
        uint8, shape (B, 3, H, W), RGB, on any device.
    mean, std : sequence of 3 floats or tensor broadcastable to (1, 3, 1, 1)
        Per-channel statistics on the 0-1 scale (as timm's and torchvision's data configs give
        them).
    channels_last : bool, default False
        Return the result in channels-last memory format (faster convolutions on CPUs and
        tensor cores).

    Returns
    -------
    torch.Tensor
        float32, shape (B, 3, H, W): ``(images / 255 - mean) / std``.
    """
    import torch

    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.float().div_(255.0).sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def normalise_images(images: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The numpy twin of :func:`normalise_batch` for channels-last uint8 arrays.

    Parameters
    ----------
    images : numpy.ndarray
        uint8, shape (N, H, W, 3), RGB.
    mean, std : sequence of 3 floats
        Per-channel statistics on the 0-1 scale.

    Returns
    -------
    numpy.ndarray
        float32, shape (N, 3, H, W), C-contiguous: ``(images / 255 - mean) / std``.

    Raises
    ------
    MedtuneError
        When ``images`` is not a uint8 (N, H, W, 3) array.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise MedtuneError(f"expected images shaped N x H x W x 3, got {tuple(x.shape)}")
    if x.dtype != np.uint8:
        raise MedtuneError(f"expected uint8 images (0-255), got dtype {x.dtype}")
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    chw = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((chw - m) / s, dtype=np.float32)
