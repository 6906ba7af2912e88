"""The fine-tuning recipe: frozen stages, per-stage learning rates, decay exemptions, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from medtune.config import FinetuneRecipe, InputSpec
from medtune.engines.lightning_module import FinetuneModule
from medtune.models import TransferModel, create_backbone
from medtune.transfer.recipe import lr_lambda, stage_lr_multipliers


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", weights=None)


def make_module(backbone, **recipe) -> FinetuneModule:
    model = TransferModel(backbone, 5)
    return FinetuneModule(
        model,
        FinetuneRecipe(**recipe),
        spec=InputSpec(32, (0.5,) * 3, (0.25,) * 3),
        steps_per_epoch=4,
        epochs=3,
    )


def test_frozen_stages_have_no_gradients_and_no_optimizer_group(lite0):
    module = make_module(lite0, freeze=2, lr=0.1, backbone_lr_mult=0.1)
    frozen_prefixes = [p for s in lite0.stages[:2] for p in s.modules]
    for name, param in module.model.backbone.named_parameters():
        in_frozen = any(name == p or name.startswith(p + ".") for p in frozen_prefixes)
        assert param.requires_grad is not in_frozen, name
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in optimised for p in frozen)
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert all(id(p) in optimised for p in trainable)


def test_head_gets_base_lr_and_pretrained_stages_the_multiplier(lite0):
    module = make_module(lite0, lr=0.2, backbone_lr_mult=0.1, weight_decay=1e-3)
    groups = module.configure_optimizers()["optimizer"].param_groups
    head = {id(module.model.head.weight), id(module.model.head.bias)}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        expected = 0.2 if ids <= head else 0.2 * 0.1
        assert group["initial_lr"] == pytest.approx(expected)
        # L2 only on weight matrices / kernels, never on biases and BatchNorm parameters
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == pytest.approx(1e-3)


def test_layer_decay_lowers_the_rate_towards_the_input():
    mults = stage_lr_multipliers(FinetuneRecipe(backbone_lr_mult=0.5, layer_decay=0.5), 4)
    assert mults == pytest.approx([0.0625, 0.125, 0.25, 0.5])


def test_schedule_warms_up_then_decays_to_the_floor_and_head_epochs_hold_the_body():
    recipe = FinetuneRecipe(warmup_epochs=1, lr_floor=0.05, head_epochs=1)
    body = lr_lambda(recipe, steps_per_epoch=10, total_epochs=5, is_backbone=True)
    head = lr_lambda(recipe, steps_per_epoch=10, total_epochs=5, is_backbone=False)
    assert head(0) == pytest.approx(0.1) and head(9) == pytest.approx(1.0)
    assert body(5) == 0.0 and body(10) > 0.9
    assert head(49) == pytest.approx(0.05, abs=0.01)
    values = [head(s) for s in range(10, 50)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    step = lr_lambda(FinetuneRecipe(schedule="step", lr_floor=0.001, warmup_epochs=0), 10, 3, False)
    assert step(0) == 1.0 and math.isclose(step(29), 0.01)
    flat = FinetuneRecipe(schedule="constant", warmup_epochs=1, head_epochs=1)
    flat_body = lr_lambda(flat, 10, 5, True)
    assert flat_body(5) == 0.0 and [flat_body(s) for s in (10, 30, 49)] == [1.0, 1.0, 1.0]
    assert lr_lambda(flat, 10, 5, False)(4) == pytest.approx(0.5)  # still warms up


def test_frozen_batchnorm_statistics_stay_fixed_while_training(lite0):
    module = make_module(lite0, freeze=2, lr=0.05)
    module.train()
    frozen_bns = module.frozen_norms
    assert frozen_bns and all(not bn.training for bn in frozen_bns)
    before = [bn.running_mean.clone() for bn in frozen_bns]
    later_bn = next(
        m
        for n, m in module.model.backbone.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and m not in frozen_bns
    )
    later_before = later_bn.running_mean.clone()
    images = torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    optimizer = module.configure_optimizers()["optimizer"]
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(module(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for bn, old in zip(frozen_bns, before, strict=True):
        assert torch.equal(bn.running_mean, old)
    assert not torch.equal(later_bn.running_mean, later_before)


def test_inverse_frequency_class_weights_and_balanced_sampler():
    import numpy as np

    from medtune.data import Part
    from medtune.engines.datamodule import CacheDataModule, class_weights

    labels = np.array([0] * 8 + [1] * 2 + [2] * 2)
    weights = class_weights(labels, 4)
    assert weights[3] == 0.0
    assert weights[1] == pytest.approx(4 * weights[0]) and weights[1] == weights[2]

    class FakeCache:
        def __init__(self):
            self.labels = labels
            self.sites = None

    dm = CacheDataModule(
        Part(FakeCache(), np.arange(12)),
        Part(FakeCache(), np.arange(2)),
        batch_size=4,
        balanced_sampler=True,
        seed=0,
    )
    sampler = dm._balanced_sampler()  # one per fit; its generator moves on every epoch
    drawn = np.concatenate([labels[list(iter(sampler))] for _ in range(100)])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert share == pytest.approx([1 / 3] * 3, abs=0.06)
