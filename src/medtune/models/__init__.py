"""Backbones (EfficientNet-Lite0, GoogLeNet, any timm/torchvision model), stages, the new head."""

from medtune.models.backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    create_backbone,
    load_state_dict_file,
    resolve_name,
)
from medtune.models.classifier import TransferModel, build_model
from medtune.models.feature_extractor import FeatureExtractor
from medtune.models.stages import (
    Stage,
    StageTaps,
    param_stage_index,
    stage_map,
    stage_parameters,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "FeatureExtractor",
    "Stage",
    "StageTaps",
    "TransferModel",
    "build_model",
    "create_backbone",
    "load_state_dict_file",
    "param_stage_index",
    "resolve_name",
    "stage_map",
    "stage_parameters",
]
