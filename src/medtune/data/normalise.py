"""Input normalisation, the one home of ``x = (pixel / 255 - mean) / std``.

Images travel as uint8 RGB until the last moment (the prepared cache, the loaders, TTA views);
this module turns them into what an ImageNet-pretrained network expects. Two twins compute the
same thing (to 1e-7): :func:`normalise_batch` on torch tensors (channels first, any device) and
:func:`normalise_images` on numpy arrays (channels last in, channels first out, by a lookup
table: :func:`normalisation_table`) for the ONNX engine. This module imports torch only inside
:func:`normalise_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune.errors import MedtuneError

if TYPE_CHECKING:
    import torch

__all__ = ["normalisation_table", "normalise_batch", "normalise_images", "normalise_with_table"]


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

    Computed by table lookup (:func:`normalisation_table`, :func:`normalise_with_table`); equal
    to ``(images / 255 - mean) / std`` in float32 to 1e-7.

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
    return normalise_with_table(images, normalisation_table(mean, std))


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The normalised value of every uint8 level per channel: a (3, 256) float32 lookup table.

    ``table[c, v] == (v / 255 - mean[c]) / std[c]`` (computed in float64, rounded once). Looking
    values up is 7x faster than :func:`normalise_images`' float arithmetic on a 2-core CPU (6.5
    vs 49 ms for 32 images of 224 px) and agrees with it to 1e-7; numpy has no fused
    "uint8 to normalised float" routine, hence this table.

    Parameters
    ----------
    mean, std : sequence of 3 floats
        Per-channel statistics on the 0-1 scale.

    Returns
    -------
    numpy.ndarray
        float32, shape (3, 256).
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    m = np.asarray(mean, dtype=np.float64).reshape(3, 1)
    s = np.asarray(std, dtype=np.float64).reshape(3, 1)
    return ((levels[None, :] - m) / s).astype(np.float32)


def normalise_with_table(images: Any, table: np.ndarray) -> np.ndarray:
    """:func:`normalise_images` through a :func:`normalisation_table` (same result, faster).

    Parameters
    ----------
    images : numpy.ndarray
        uint8, shape (N, H, W, 3), RGB.
    table : numpy.ndarray
        float32, shape (3, 256).

    Returns
    -------
    numpy.ndarray
        float32, shape (N, 3, H, W), C-contiguous.

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
    out = np.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], x[..., c], out=out[:, c])
    return out
