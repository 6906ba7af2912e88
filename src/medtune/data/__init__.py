"""medtune.data: read labelled image sets, decode robustly, split, cache, and serve to torch.

``CachedImageDataset`` is imported lazily so that ``import medtune.data`` does not import torch
(cache-building worker processes and the CLI start faster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medtune.data.cache import PreparedCache, open_cache, prepare, prepare_image
from medtune.data.images import load_rgb
from medtune.data.sources import ImageSet, load_imageset
from medtune.data.splits import make_splits, read_splits, write_splits

if TYPE_CHECKING:
    from medtune.data.datasets import CachedImageDataset

__all__ = [
    "CachedImageDataset",
    "ImageSet",
    "PreparedCache",
    "load_imageset",
    "load_rgb",
    "make_splits",
    "open_cache",
    "prepare",
    "prepare_image",
    "read_splits",
    "write_splits",
]


def __getattr__(name: str) -> Any:
    if name == "CachedImageDataset":
        from medtune.data.datasets import CachedImageDataset

        return CachedImageDataset
    raise AttributeError(f"module 'medtune.data' has no attribute {name!r}")
