"""How a :class:`~medtune.config.FinetuneRecipe` is applied: frozen stages, per-stage learning
rates, decay exemptions, L2-SP and the schedule.

Everything here is driven by the backbone's stage map (:func:`medtune.models.param_stage_index`),
so it works for any backbone without per-model tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from medtune.config import FinetuneRecipe


def frozen_parameter_names(stage_index: dict[str, int], freeze: int) -> set[str]:
    """Names of the backbone parameters in the first ``freeze`` stages."""
    return {name for name, idx in stage_index.items() if idx < freeze}


def apply_freeze(backbone: nn.Module, stage_index: dict[str, int], freeze: int) -> list[nn.Module]:
    """Turn off gradients for the first ``freeze`` stages; return their normalisation layers.

    The returned BatchNorm modules must be kept in eval mode while training (see
    :func:`keep_frozen_norms_in_eval`), so that their running statistics stay fixed too.
    """
    frozen = frozen_parameter_names(stage_index, freeze)
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen)
    frozen_modules = _modules_owning(backbone, frozen)
    return [m for m in frozen_modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _modules_owning(root: nn.Module, param_names: set[str]) -> list[nn.Module]:
    owners = []
    for mod_name, module in root.named_modules():
        own = [
            f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)
        ]
        if own and all(p in param_names for p in own):
            owners.append(module)
    return owners


def keep_frozen_norms_in_eval(norms: Iterable[nn.Module]) -> None:
    for module in norms:
        module.eval()


def stage_lr_multipliers(recipe: FinetuneRecipe, n_stages: int) -> list[float]:
    """Learning-rate multiplier of each backbone stage (the head is 1.0).

    With ``layer_decay`` the last stage gets ``backbone_lr_mult`` and every earlier stage a further
    factor ``layer_decay`` (Howard & Ruder's discriminative rates); otherwise all stages share
    ``backbone_lr_mult``.
    """
    if recipe.layer_decay is None:
        return [recipe.backbone_lr_mult] * n_stages
    return [
        recipe.backbone_lr_mult * recipe.layer_decay ** (n_stages - 1 - i) for i in range(n_stages)
    ]


def build_param_groups(
    model: nn.Module,
    backbone_prefix: str,
    stage_index: dict[str, int],
    n_stages: int,
    recipe: FinetuneRecipe,
) -> list[dict]:
    """Optimizer parameter groups: one per (stage, decay/no-decay), plus the head.

    Weight decay (L2) is not applied to biases and normalisation parameters (1-D tensors).
    Each group carries ``lr_mult`` and ``is_backbone`` for the scheduler.
    """
    mults = stage_lr_multipliers(recipe, n_stages)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stage = _stage_for(name, backbone_prefix, stage_index)
        decay = param.ndim > 1
        key = (stage, decay)
        if key not in groups:
            mult = 1.0 if stage < 0 else mults[stage]
            groups[key] = {
                "params": [],
                "names": [],
                "lr": recipe.lr * mult,
                "lr_mult": mult,
                "weight_decay": recipe.weight_decay if decay else 0.0,
                "is_backbone": stage >= 0,
                "stage": stage,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _stage_for(name: str, backbone_prefix: str, stage_index: dict[str, int]) -> int:
    prefix = backbone_prefix + "."
    if name.startswith(prefix):
        inner = name[len(prefix) :]
        if inner in stage_index:
            return stage_index[inner]
        raise KeyError(f"parameter {name} belongs to no backbone stage")
    return -1  # the new head


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9):
    """SGD with Nesterov momentum or AdamW (decoupled decay) over the groups."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; use sgd or adamw")


def lr_lambda(
    recipe: FinetuneRecipe, steps_per_epoch: int, total_epochs: int, is_backbone: bool
) -> Callable[[int], float]:
    """Per-step factor: linear warm-up, then cosine (or step) decay to ``lr_floor``, or none
    (``constant``, the schedule SWAD averages over: Cha et al. 2021).

    During the first ``head_epochs`` the backbone's factor is 0: only the new head trains. Using a
    zero rate rather than toggling ``requires_grad`` keeps the parameter set fixed, which DDP needs.
    """
    total = max(1, steps_per_epoch * total_epochs)
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    head_steps = recipe.head_epochs * steps_per_epoch
    floor = recipe.lr_floor

    def factor(step: int) -> float:
        if is_backbone and step < head_steps:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if recipe.schedule == "constant":
            return 1.0
        if recipe.schedule == "step":
            return max(floor, 0.1 ** int(progress * 3))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def l2sp_penalty(
    named_params: Iterable[tuple[str, torch.Tensor]], anchors: dict[str, torch.Tensor]
) -> torch.Tensor:
    """L2-SP (Li et al., 2018): squared distance of the backbone weights to the pretrained ones."""
    terms = [((p - anchors[n]) ** 2).sum() for n, p in named_params if n in anchors]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
