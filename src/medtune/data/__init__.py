"""medtune.data: read labelled image sets, decode robustly, split, cache, and serve to torch.

Names are imported lazily (PEP 562, through ``lazy_loader``), so that importing one light
submodule (``preprocess``, ``normalise``, ``fundus``, ``images``: numpy, PIL and scipy only) does
not import pandas or torch: the torch-free ONNX predictor and the cache-building worker processes
rely on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from medtune.data.cache import Part, PreparedCache, open_cache, prepare  # noqa: F401
    from medtune.data.datasets import CachedImageDataset  # noqa: F401
    from medtune.data.images import load_rgb  # noqa: F401
    from medtune.data.imageset import ImageSet  # noqa: F401
    from medtune.data.preprocess import prepare_image  # noqa: F401
    from medtune.data.sources import load_imageset  # noqa: F401
    from medtune.data.splits import make_splits, read_splits, write_splits  # noqa: F401

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "cache": ["Part", "PreparedCache", "open_cache", "prepare"],
        "datasets": ["CachedImageDataset"],
        "images": ["load_rgb"],
        "preprocess": ["prepare_image"],
        "imageset": ["ImageSet"],
        "sources": ["load_imageset"],
        "splits": ["make_splits", "read_splits", "write_splits"],
    },
)
