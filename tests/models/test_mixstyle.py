"""MixStyle (Zhou et al. 2021) and DSU (Li et al. 2022): feature statistics changed while
training, nothing at inference."""

from __future__ import annotations

import pytest
import torch

from medtune.models.backbones import create_backbone
from medtune.models.classifier import TransferModel
from medtune.models.mixstyle import (
    DSU,
    MixStyle,
    attach_mixstyle,
    attach_style,
    mix_statistics,
    mixstyle_stages,
    perturb_statistics,
)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)


def test_mixed_maps_carry_the_mixed_statistics_and_keep_their_pattern():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    x = x + torch.arange(4.0).view(4, 1, 1, 1)
    perm = torch.tensor([1, 0, 3, 2])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    out = mix_statistics(x, lam, perm)
    mu, sd = _stats(x)
    mu_out, sd_out = _stats(out)
    w = lam.view(-1, 1)
    torch.testing.assert_close(mu_out, w * mu + (1 - w) * mu[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd_out, w * sd + (1 - w) * sd[perm], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out[0], x[0], atol=1e-4, rtol=1e-4)  # lam 1: the image itself
    # the spatial pattern (the normalised map) is the image's own, whatever the style
    norm = (out - mu_out[..., None, None]) / sd_out[..., None, None]
    own = (x - mu[..., None, None]) / sd[..., None, None]
    torch.testing.assert_close(norm, own, atol=1e-3, rtol=1e-3)


def test_dsu_draws_statistics_as_wide_as_the_batch_varies_and_keeps_the_pattern():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    x = torch.randn(4, 3, 8, 8, generator=g) * scale + torch.arange(4.0).view(4, 1, 1, 1)
    noise = torch.randn(2, 4, 3, 1, 1, generator=g)
    out = perturb_statistics(x, noise)
    mu, sd = _stats(x)
    mu_out, sd_out = _stats(out)
    s_mu, s_sd = mu.std(dim=0, keepdim=True), sd.std(dim=0, keepdim=True)  # over the batch
    torch.testing.assert_close(mu_out, mu + noise[0, ..., 0, 0] * s_mu, atol=1e-3, rtol=1e-3)
    gamma = sd + noise[1, ..., 0, 0] * s_sd  # may fall below 0 (no clamp in the paper): a flip
    torch.testing.assert_close(sd_out, gamma.abs(), atol=1e-2, rtol=1e-2)
    norm = (out - mu_out[..., None, None]) / gamma[..., None, None]
    own = (x - mu[..., None, None]) / sd[..., None, None]
    torch.testing.assert_close(norm, own, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(perturb_statistics(x, torch.zeros_like(noise)), x)
    # one style in the whole batch: nothing to draw from, the maps stay as they are
    same = x[:1].expand(4, -1, -1, -1)
    torch.testing.assert_close(perturb_statistics(same, noise), same, atol=1e-2, rtol=1e-2)
    # the statistics are not detached (the paper): gradients reach the input through them
    leaf = x.clone().requires_grad_(True)
    perturb_statistics(leaf, noise).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_hook_mixes_only_in_training_mode_and_with_its_probability():
    conv = torch.nn.Conv2d(3, 3, 1)
    x = torch.randn(8, 3, 6, 6)
    y = conv(x)
    always = MixStyle(1.0)
    conv.eval()
    assert always(conv, (x,), y) is None  # evaluation: untouched
    conv.train()
    assert not torch.allclose(always(conv, (x,), y), y)
    assert always(conv, (x,), y[:1]) is None  # one image has no partner
    torch.manual_seed(0)
    half = MixStyle(0.5)
    mixed = sum(half(conv, (x,), y) is not None for _ in range(400))
    assert 160 < mixed < 240
    with pytest.raises(ValueError, match="probability"):
        MixStyle(0.0)
    dsu = DSU(1.0)
    assert dsu(conv, (x,), y) is not None and not torch.allclose(dsu(conv, (x,), y), y)
    conv.eval()
    assert dsu(conv, (x,), y) is None


def test_attached_to_the_stride_4_and_8_stages_and_removed_without_trace():
    model = TransferModel(create_backbone("test_efficientnet", weights=None), 3)
    taps = mixstyle_stages(model.backbone, model.stages)
    assert len(taps) == 2
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    handles = attach_mixstyle(model.backbone, model.stages, p=1.0)
    handles += attach_style(model.backbone, model.stages, DSU(1.0))
    with torch.no_grad():
        assert torch.equal(model(x), before)  # eval mode: inference is untouched
        model.train()
        torch.manual_seed(1)
        assert not torch.allclose(model(x), before, atol=1e-3)
    for handle in handles:
        handle.remove()
    # the training pass moved BatchNorm's running statistics: compare with a hook-free copy
    clean = TransferModel(create_backbone("test_efficientnet", weights=None), 3)
    clean.load_state_dict(model.state_dict())
    assert not any(m._forward_hooks for m in model.modules())
    model.train()  # where a hook left behind would still mix
    clean.train()
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))
