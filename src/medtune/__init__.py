"""medtune: transfer learning and fine-tuning of ImageNet-pretrained CNNs on medical images.

The public API, one function per job (the command-line tool is a thin skin over these)::

    import medtune

    run = medtune.train("data/", strategy="finetune", out="runs/dr")
    result = medtune.evaluate(run.dir, tta="rot90")
    rows = medtune.predict(["photo.jpg"], run=run.dir)
    exported = medtune.export(run.dir, fmt="onnx")
    advice = medtune.advise("data/")
    adapted = medtune.adapt(run.dir, "site_b_images/", out="runs/dr-site-b")
    medtune.serve(model_path="runs/dr/export/model.onnx")  # web page on 127.0.0.1:8000

Names are imported on first use (PEP 562, through ``lazy_loader``), so ``import medtune`` is
cheap and the torch-free ONNX predictor (:mod:`medtune.deploy.onnx_predictor`) never imports
torch. Layers and where each concept lives: ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

from medtune.version import __version__

if TYPE_CHECKING:  # what an IDE and a type checker see; at run time names load on first use
    from medtune.config import FinetuneRecipe, InputSpec, TrainConfig  # noqa: F401
    from medtune.data import load_imageset, prepare  # noqa: F401
    from medtune.models import create_backbone  # noqa: F401
    from medtune.runs import RunFolder  # noqa: F401
    from medtune.workflows.adapt import AdaptResult, adapt  # noqa: F401
    from medtune.workflows.advise import advise  # noqa: F401
    from medtune.workflows.evaluate import EvalResult, evaluate  # noqa: F401
    from medtune.workflows.export import export  # noqa: F401
    from medtune.workflows.predict import predict  # noqa: F401
    from medtune.workflows.serve import serve  # noqa: F401
    from medtune.workflows.train import RunResult, resume, train  # noqa: F401

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "workflows.train": ["train", "resume", "RunResult"],
        "workflows.evaluate": ["evaluate", "EvalResult"],
        "workflows.predict": ["predict"],
        "workflows.export": ["export"],
        "workflows.advise": ["advise"],
        "workflows.adapt": ["adapt", "AdaptResult"],
        "workflows.serve": ["serve"],
        "config": ["TrainConfig", "FinetuneRecipe", "InputSpec"],
        "runs": ["RunFolder"],
        "data": ["load_imageset", "prepare"],
        "models": ["create_backbone"],
    },
)
__all__ = [*__all__, "__version__"]
