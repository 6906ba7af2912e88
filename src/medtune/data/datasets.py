"""Torch datasets over a :class:`~medtune.data.cache.PreparedCache`.

Items are ``(uint8 tensor C x H x W, int label)``; conversion to float and normalisation happen
later on the whole batch (on the GPU). The default augmentation is exact: rotations by multiples of
90 degrees and flips, which need no interpolation and suit fundus photos (no canonical
orientation). Site augmentation (:mod:`medtune.data.site_augment`: brightness, contrast, gamma,
colour temperature, blur, JPEG, scale, inside the field of view) is added on request; its
field-of-view mask comes from the cache (``fov.npy``, detected once per image by ``prepare``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medtune.data.cache import PreparedCache
from medtune.data.site_augment import augment_site

__all__ = ["CachedImageDataset"]


class CachedImageDataset(Dataset):
    """Rows ``indices`` of a prepared cache, optionally augmented by rot90, flips and ``site``.

    ``site``: names from :func:`medtune.data.site_augment.resolve_augment`, applied after the
    rotation and flips.

    ``seed=None``: random augmentation from torch's RNG (DataLoader seeds each worker).
    ``seed=int``: a numpy generator per process seeded from ``seed``, the epoch given to
    :meth:`set_epoch` and the DataLoader worker's id and seed; it advances with every item, so
    augmentations differ between epochs and are reproducible for the same seeds and loader setup.
    The memmap is opened lazily in each process (works with DataLoader workers).
    """

    def __init__(
        self,
        cache: PreparedCache,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        rot90: bool = True,
        hflip: bool = False,
        vflip: bool = False,
        site: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> None:
        self.cache = cache
        n = len(cache)
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"indices out of range for a cache of {n} images")
        self.rot90, self.hflip, self.vflip = rot90, hflip, vflip
        self.site = tuple(site)
        self.seed = seed
        self.epoch = 0
        self._images: np.ndarray | None = None
        self._rng: np.random.Generator | None = None
        self._rng_token: tuple[int, int, int] | None = None

    @property
    def labels(self) -> np.ndarray:
        """Labels of this dataset's items (for samplers and class weights)."""
        return self.cache.labels[self.indices]

    def set_epoch(self, epoch: int) -> None:
        """Restart the seeded generator for ``epoch`` (optional; it advances on its own)."""
        self.epoch = int(epoch)
        self._rng = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_images"] = None
        state["_rng"] = state["_rng_token"] = None
        return state

    def _array(self, row: int) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.cache.dir / "images.npy", mmap_mode="r")
        return np.array(self._images[row])  # copy out of the read-only map

    def _generator(self) -> np.random.Generator:
        if self.seed is None:  # unseeded: a fresh stream from torch's RNG (seeded per worker)
            return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        info = torch.utils.data.get_worker_info()
        token = (self.epoch, info.id, info.seed) if info is not None else (self.epoch, 0, 0)
        if self._rng is None or self._rng_token != token:
            self._rng = np.random.default_rng([self.seed, *token])
            self._rng_token = token
        return self._rng

    def _draws(self) -> tuple[int, bool, bool]:
        if self.seed is None:
            r = torch.randint(0, 4, (3,)).tolist()
        else:
            r = self._generator().integers(0, 4, 3).tolist()
        return int(r[0]), r[1] % 2 == 1, r[2] % 2 == 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[index])
        img = torch.from_numpy(self._array(row)).permute(2, 0, 1)
        # the FOV mask stored by prepare (not detected every epoch), turned with the image
        fov = torch.from_numpy(self.cache.fov_mask(row)).unsqueeze(0) if self.site else None
        if self.rot90 or self.hflip or self.vflip:
            k, h, v = self._draws()
            img, fov = (self._turn(x, k, h, v) for x in (img, fov))
        if self.site:
            img = augment_site(img, self.site, self._generator(), fov=fov[0])
        return img.contiguous(), int(self.cache.labels[row])

    def _turn(self, x: torch.Tensor | None, k: int, h: bool, v: bool) -> torch.Tensor | None:
        """``x`` (C x H x W) rotated by ``k`` quarter turns and flipped as the flags say."""
        if x is None:
            return None
        if self.rot90 and k:
            x = torch.rot90(x, k, dims=(1, 2))
        if self.hflip and h:
            x = torch.flip(x, dims=(2,))
        if self.vflip and v:
            x = torch.flip(x, dims=(1,))
        return x
