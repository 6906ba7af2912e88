"""Training: the Lightning engine, run folders, resume, and ``medtune.train()``."""

from medtune.training.config import TrainConfig
from medtune.training.run import RunResult, resume, train

__all__ = ["RunResult", "TrainConfig", "resume", "train"]
