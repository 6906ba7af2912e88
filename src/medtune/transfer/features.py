"""Backbone features computed ONCE per (backbone, stage, rotation) and cached beside the images.

The probes (scenarios 1 and 3) and the advisor read these arrays instead of running the frozen
backbone every epoch. Files live in ``<prepared cache>/features/<backbone id>/`` and are written
atomically, so a killed extraction leaves only complete files and the next run computes the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medtune.data import PreparedCache
from medtune.data.normalise import normalise_batch
from medtune.io import atomic_path
from medtune.models import Backbone, StageTaps

TOP = "top"  # the backbone's final pooled features (what the original classifier sees)


def backbone_id(backbone: Backbone, precision: str) -> str:
    """A folder name that changes whenever the features would change: a hash of the weights
    themselves (whatever their source or seed), the input normalisation and the precision."""
    digest = hashlib.sha256(f"{backbone.mean}|{backbone.std}|{precision}".encode())
    for name, tensor in backbone.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return f"{backbone.name}-{digest.hexdigest()[:10]}"


def extract_features(
    backbone: Backbone,
    cache: PreparedCache,
    stages: Sequence[str],
    *,
    rotations: Sequence[int] = (0,),
    model_id: str,
    batch_size: int = 64,
    bf16: bool = True,
    progress: bool = True,
) -> dict[tuple[str, int], np.ndarray]:
    """Return ``{(stage, k): float32 array (N, C)}`` for every image of ``cache``.

    ``stage`` is a stage name or :data:`TOP`; ``k`` rotates the images by ``k * 90`` degrees
    (exact ``torch.rot90``). Missing arrays are computed in one pass per rotation and cached.
    """
    folder = Path(cache.dir) / "features" / model_id
    wanted = {(s, k): folder / f"{s}_rot{k}.npy" for s in stages for k in rotations}
    missing = [key for key, path in wanted.items() if not path.is_file()]
    for k in sorted({k for _, k in missing}):
        names = [s for s, kk in missing if kk == k]
        computed = _run_backbone(backbone, cache, names, k, batch_size, bf16, progress)
        for name, array in computed.items():
            with atomic_path(wanted[(name, k)]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
    return {key: np.load(path) for key, path in wanted.items()}


def _run_backbone(
    backbone: Backbone,
    cache: PreparedCache,
    names: list[str],
    rotation: int,
    batch_size: int,
    bf16: bool,
    progress: bool,
) -> dict[str, np.ndarray]:
    backbone.model.eval()
    tapped = [n for n in names if n != TOP]
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    images = cache.images
    starts = range(0, len(images), batch_size)
    bar = tqdm(starts, desc=f"features rot{rotation * 90}", disable=not progress, unit="batch")
    with StageTaps(backbone, tapped) as taps, torch.inference_mode():
        for start in bar:
            batch = torch.from_numpy(np.array(images[start : start + batch_size]))
            x = normalise_batch(batch.permute(0, 3, 1, 2), backbone.mean, backbone.std)
            x = torch.rot90(x, rotation, dims=(2, 3)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pooled = taps(x)
            if TOP in outputs:
                outputs[TOP].append(taps.output.float().numpy())
            for name, value in pooled.items():
                outputs[name].append(value.float().numpy())
    return {n: np.concatenate(v).astype(np.float32) for n, v in outputs.items()}
