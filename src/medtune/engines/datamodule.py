"""Loaders over the prepared image cache: train (augmented), val and test (plain, indexed)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from medtune.data import CachedImageDataset, Part


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


class CacheDataModule(L.LightningDataModule):
    """Lightning data module over prepared caches; augmentation is exact rot90 (and flips), plus
    site augmentation when ``site_augment`` names some (:mod:`medtune.data.site_augment`).

    Training batches are ``(images, labels, positions in the train split)``. Under DDP, Lightning
    gives each process a disjoint shard (``DistributedSampler``; a ``--balanced-sampler`` is
    wrapped so its draws are sharded too); ``--batch-size`` is per process.
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_part, self.val_part = train, val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment = {"rot90": rot90, "hflip": hflip, "vflip": vflip, "site": site_augment}
        self.balanced_sampler, self.seed = balanced_sampler, seed

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
        sampler = self._balanced_sampler() if self.balanced_sampler else None
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
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(weights.tolist(), len(labels), generator=generator)

    def val_dataloader(self) -> DataLoader:
        return plain_loader(self.val_part, self.batch_size, self.num_workers)


def plain_loader(part: Part, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Unaugmented, ordered loader yielding ``(images, labels, positions)``."""
    ds = WithPosition(CachedImageDataset(part.cache, part.indices, rot90=False))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
