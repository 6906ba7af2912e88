"""Loaders over the prepared image cache: train (augmented), val and test (plain, indexed)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from medtune.data import CachedImageDataset, Part
from medtune.errors import MedtuneError


class WithPosition(Dataset):
    """Adds each item's position in the split, so predictions can be de-duplicated under DDP."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[i]
        return image, label, i


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency class weights with mean 1 (classes absent from ``labels`` get 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return (weights / weights[weights > 0].mean()).tolist()


def rank_seed(seed: int, rank: int) -> int:
    """Augmentation seed of a process: rank 0 keeps ``seed``, the others get independent streams."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def sampling_weights(
    labels: np.ndarray,
    sites: list[str] | np.ndarray | None = None,
    *,
    site_balance: float = 1.0,
    class_balanced: bool = False,
) -> np.ndarray:
    """Per-image draw weights for a ``WeightedRandomSampler``, summing to 1.

    A site ``s`` with ``n_s`` training images is drawn with probability proportional to
    ``n_s ** site_balance``: 1 draws every image equally often (sites in proportion to their
    size, plain shuffling), 0 draws every site equally often, values between temper the larger
    sites (temperature sampling, as for unbalanced languages in multilingual training:
    Arivazhagan et al. 2019, "Massively multilingual neural machine translation in the wild").
    Inside a site, images are drawn uniformly or, with ``class_balanced``, every class of that
    site equally often.

    Parameters
    ----------
    labels : ndarray of int, shape (N,)
        Class labels of the training images.
    sites : sequence of str, shape (N,), or None
        Site of each image; ``None`` is one site.
    site_balance : float, default 1.0
        The exponent ``alpha`` in ``P(site) ~ n_site ** alpha``, in [0, 1].
    class_balanced : bool, default False
        Draw the classes of each site equally often (``--balanced-sampler``).

    Returns
    -------
    ndarray of float, shape (N,)
        Non-negative weights summing to 1.

    Raises
    ------
    MedtuneError
        When ``site_balance`` is outside [0, 1] or ``sites`` has the wrong length.
    """
    labels = np.asarray(labels)
    if not 0.0 <= float(site_balance) <= 1.0:
        raise MedtuneError(
            f"site_balance must be in [0, 1] (1: sites by size, 0: equally), got {site_balance}"
        )
    site_ids = np.zeros(len(labels), dtype=np.int64)
    if sites is not None:
        if len(sites) != len(labels):
            raise MedtuneError(f"{len(sites)} site names for {len(labels)} training images")
        site_ids = np.unique(np.asarray(sites, dtype=str), return_inverse=True)[1]
    weights = np.zeros(len(labels), dtype=np.float64)
    for s in np.unique(site_ids):
        rows = np.flatnonzero(site_ids == s)
        share = len(rows) ** float(site_balance)  # the site's share of the draws, unnormalised
        if class_balanced:
            classes, counts = np.unique(labels[rows], return_counts=True)
            per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
            inside = np.array([1.0 / (len(classes) * per_class[y]) for y in labels[rows].tolist()])
        else:
            inside = np.full(len(rows), 1.0 / len(rows))
        weights[rows] = share * inside
    return weights / weights.sum()


class CacheDataModule(L.LightningDataModule):
    """Lightning data module over prepared caches; augmentation is exact rot90 (and flips), plus
    site augmentation when ``site_augment`` names some (:mod:`medtune.data.site_augment`).

    Training batches are ``(images, labels, positions in the train split)``. Under DDP, Lightning
    gives each process a disjoint shard (``DistributedSampler``; a ``--balanced-sampler`` is
    wrapped so its draws are sharded too); ``--batch-size`` is per process. ``site_balance``
    below 1 (or ``balanced_sampler``) draws with replacement by :func:`sampling_weights`.
    """

    def __init__(
        self,
        train: Part,
        val: Part,
        *,
        batch_size: int,
        num_workers: int = 0,
        rot90: bool = True,
        hflip: bool = False,
        vflip: bool = False,
        site_augment: tuple[str, ...] = (),
        balanced_sampler: bool = False,
        site_balance: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_part, self.val_part = train, val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment = {"rot90": rot90, "hflip": hflip, "vflip": vflip, "site": site_augment}
        self.balanced_sampler, self.seed = balanced_sampler, seed
        self.site_balance = float(site_balance)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        ds = WithPosition(
            CachedImageDataset(
                self.train_part.cache,
                self.train_part.indices,
                seed=rank_seed(self.seed, rank),
                **self.augment,
            )
        )
        weighted = self.balanced_sampler or (
            self.site_balance != 1.0 and self.train_part.sites is not None
        )
        sampler = self._balanced_sampler() if weighted else None
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            # each process gets ceil(n / world) items: drop a ragged last batch, never all of them
            drop_last=math.ceil(len(ds) / world) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _balanced_sampler(self) -> WeightedRandomSampler:
        labels = self.train_part.labels
        weights = sampling_weights(
            labels,
            self.train_part.sites,
            site_balance=self.site_balance,
            class_balanced=self.balanced_sampler,
        )
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(weights.tolist(), len(labels), generator=generator)

    def val_dataloader(self) -> DataLoader:
        return plain_loader(self.val_part, self.batch_size, self.num_workers)


def plain_loader(part: Part, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Unaugmented, ordered loader yielding ``(images, labels, positions)``."""
    ds = WithPosition(CachedImageDataset(part.cache, part.indices, rot90=False))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
