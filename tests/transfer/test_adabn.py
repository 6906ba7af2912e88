"""AdaBN: only the fine-tuned BatchNorm layers get the new site's statistics; nothing else moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.errors import MedtuneError
from medtune.models import TransferModel, create_backbone
from medtune.transfer.adabn import adabn, adaptable_norms

FREEZE = 3  # stem, blocks.0, blocks.1 of timm's test_efficientnet


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = TransferModel(create_backbone("test_efficientnet", weights=None), 3, dropout=0.5)
    with torch.no_grad():  # give every BatchNorm non-default statistics to tell changes apart
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return net


def _batches(n: int = 3, size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=gen) * 2 + 1.5 for _ in range(n)]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_split_follows_the_stage_map(model):
    adapt, keep = adaptable_norms(model, FREEZE)
    frozen = [m for s in model.stages[:FREEZE] for m in s.modules]
    assert adapt and keep
    assert all(any(p.startswith(m + ".") or p == m for m in frozen) for p in keep)
    assert not any(any(p.startswith(m + ".") or p == m for m in frozen) for p in adapt)
    names = [s.name for s in model.stages[:FREEZE]]
    by_name = adaptable_norms(model, names)
    assert list(by_name[0]) == list(adapt) and list(by_name[1]) == list(keep)


def test_adapted_layers_hold_the_new_sites_statistics(model):
    adapt, keep = adaptable_norms(model, FREEZE)
    before = _snapshot(model)
    momenta = {p: bn.momentum for p, bn in adapt.items()}
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in adapt}
    dropout_modes: list[bool] = []
    handles = [
        bn.register_forward_pre_hook(lambda _m, args, p=p: seen[p].append(args[0].detach()))
        for p, bn in adapt.items()
    ]
    handles.append(
        model.dropout.register_forward_hook(lambda m, *_: dropout_modes.append(m.training))
    )
    model.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # AdaBN must run in fp32 regardless
            report = adabn(model, _batches(), FREEZE)
    finally:
        for handle in handles:
            handle.remove()

    assert report["layers_adapted"] == len(adapt) and report["layers_kept"] == len(keep)
    assert (report["images"], report["batches"]) == (12, 3)
    assert report["frozen_stages"] == [s.name for s in model.stages[:FREEZE]]
    assert dropout_modes == [False] * 3
    for path, bn in adapt.items():
        inputs = seen[path]
        assert len(inputs) == 3 and all(x.dtype == torch.float32 for x in inputs)
        # equal batch sizes: the cumulative mean of batch means is the mean over all images
        expected_mean = torch.cat(inputs).mean(dim=(0, 2, 3))
        expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
        assert not torch.equal(bn.running_mean, before[f"backbone.{path}.running_mean"])
        assert bn.momentum == momenta[path]

    after = model.state_dict()
    adapted_keys = {f"backbone.{p}.{b}" for p in adapt for b in ("running_mean", "running_var")}
    adapted_keys |= {f"backbone.{p}.num_batches_tracked" for p in adapt}
    for key, value in before.items():
        if key not in adapted_keys:  # weights, biases, head, frozen-stage statistics
            assert torch.equal(after[key], value), key
    assert any(f"backbone.{p}.running_mean" in before for p in keep)
    assert all(m.training for m in model.modules())  # modes restored


def test_eval_mode_is_restored(model):
    model.eval()
    adabn(model, _batches(1), FREEZE)
    assert not any(m.training for m in model.modules())


def test_numpy_batches_and_loader_tuples_are_accepted(model):
    batches = [(b.numpy(), np.zeros(4)) for b in _batches()]
    assert adabn(model, batches, FREEZE)["images"] == 12


def test_failures_leave_the_model_unchanged(model):
    before = _snapshot(model)
    with pytest.raises(MedtuneError, match="no images"):
        adabn(model, [], FREEZE)
    with pytest.raises(MedtuneError, match=r"shape \(B, 3, H, W\)"):
        adabn(model, [*_batches(1), torch.zeros(2, 1, 8, 8)], FREEZE)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_fully_frozen_backbone_has_nothing_to_adapt(model):
    with pytest.raises(MedtuneError, match="nothing to adapt") as err:
        adabn(model, _batches(1), len(model.stages))
    assert "\n" not in str(err.value)
    with pytest.raises(MedtuneError, match="between 0 and"):
        adabn(model, _batches(1), len(model.stages) + 1)
    with pytest.raises(MedtuneError, match="unknown stage"):
        adabn(model, _batches(1), ["blocks.9"])
