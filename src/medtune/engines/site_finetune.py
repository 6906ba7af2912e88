"""Fine-tuning a trained model on a small labelled sample of a new site mixed with its source
training data (``medtune adapt --labels SAMPLE --finetune``).

Only the new head and the last backbone stage train (every earlier stage frozen, their BatchNorm
statistics included), and every batch draws the source's training images and the new site's
sample equally often (:func:`medtune.engines.datamodule.sampling_weights` with two "sites" and
``site_balance=0``): rehearsal of the source data against forgetting at home (the replay idea of
Rebuffi et al. 2017, iCaRL, and of Lopez-Paz & Ranzato 2017), with the few labels of the new
site seen as often as all of home's.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler

from medtune.config import FinetuneRecipe, InputSpec
from medtune.data import CachedImageDataset, Part
from medtune.engines.datamodule import WithPosition, sampling_weights
from medtune.engines.lightning_module import FinetuneModule
from medtune.errors import MedtuneError


def finetune_on_mix(
    model: torch.nn.Module,
    source: Part,
    sample: Part,
    *,
    spec: InputSpec,
    ordinal: bool,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model``'s head and last stage in place on ``source`` + ``sample``.

    Parameters
    ----------
    model : TransferModel
        The trained model (e.g. after AdaBN); changed in place and left in eval mode.
    source : Part
        The source run's training images.
    sample : Part
        The new site's labelled sample.
    spec : InputSpec
        How the model is fed (its input normalisation).
    ordinal : bool
        Graded labels (the training loss and monitoring follow the run's).
    epochs : int, default 3
        Passes; each draws ``4 * len(sample)`` images, half from each part (with replacement).
    lr : float, default 1e-3
        Head learning rate (the last stage gets ``lr * 0.1``, the run's default multiplier).
    batch_size : int, default 16
    seed : int, default 0
    progress : bool, default False

    Returns
    -------
    dict
        ``epochs``, ``images_drawn``, ``n_source``, ``n_sample``, ``trained_stages`` (names).

    Raises
    ------
    MedtuneError
        With no source or sample images, or fewer than 1 epoch.
    """
    if len(source) == 0 or len(sample) == 0 or epochs < 1:
        raise MedtuneError(
            f"fine-tuning needs source and sample images and >= 1 epoch (got {len(source)}, "
            f"{len(sample)}, {epochs} epochs)"
        )
    L.seed_everything(seed, workers=True, verbose=False)
    n_stages = len(model.stages)
    recipe = FinetuneRecipe(lr=lr, freeze=n_stages - 1, warmup_epochs=0.0)
    parts = (source, sample)
    dataset = WithPosition(
        ConcatDataset(
            [CachedImageDataset(p.cache, p.indices, seed=seed + i) for i, p in enumerate(parts)]
        )
    )
    labels = np.concatenate([p.labels for p in parts])
    origin = ["source"] * len(source) + ["site"] * len(sample)
    weights = sampling_weights(labels, origin, site_balance=0.0)
    draws = 4 * len(sample)
    sampler = WeightedRandomSampler(
        weights.tolist(), draws, generator=torch.Generator().manual_seed(seed)
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=draws > batch_size
    )
    module = FinetuneModule(
        model, recipe, spec=spec, ordinal=ordinal, channels_last=False, epochs=epochs
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, train_dataloaders=loader)
    model.cpu().eval()
    return {
        "epochs": epochs,
        "images_drawn": draws * epochs,
        "n_source": len(source),
        "n_sample": len(sample),
        "trained_stages": f"head and backbone stage {n_stages - 1} (of 0-{n_stages - 1})",
    }
