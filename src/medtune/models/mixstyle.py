"""MixStyle: mix the feature statistics of training images in the early stages.

Zhou, Yang, Qiao & Xiang 2021, "Domain generalization with MixStyle" (ICLR): a camera or clinic
shows in the per-channel mean and spread of early feature maps (their "style"); replacing an
image's statistics by a random convex mix of its own and another training image's statistics
makes the later stages see styles between the training sites. It has no parameters and acts
only while training; inference is untouched.

Written here because no maintained package ships it: timm, torchvision and Lightning do not,
and the authors' ``Dassl.pytorch`` is a research framework that is not on PyPI. It is a forward
hook on the stage outputs of :mod:`medtune.models.stages`, so it works on any backbone whose
stages give (B, C, H, W) maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from medtune.models.stages import Stage

#: Output strides after which MixStyle mixes, as in the paper's ResNet "res1-2" setting (the
#: ends of the stride-4 and stride-8 stages: EfficientNet-Lite's blocks.1 and blocks.2).
MIX_STRIDES = (4, 8)
#: Beta(alpha, alpha) of the mixing weight: 0.1 puts most weight near 0 or 1 (the paper's value).
ALPHA = 0.1
EPS = 1e-6
_PROBE_SIDE = 64


def mix_statistics(x: Tensor, lam: Tensor, perm: Tensor, eps: float = EPS) -> Tensor:
    """Give every image the mixed channel statistics of itself and ``x[perm]``.

    Parameters
    ----------
    x : Tensor, (B, C, H, W)
        Feature maps (any float dtype; computed in float32 and returned in ``x``'s dtype).
    lam : Tensor, (B,)
        Mixing weights in [0, 1]: 1 keeps the image's own statistics.
    perm : Tensor, (B,) of int64
        The partner of every image.
    eps : float, default 1e-6
        Added to the variance before the square root.

    Returns
    -------
    Tensor, (B, C, H, W)
        ``(x - mu) / sigma * sigma_mix + mu_mix`` with ``mu``, ``sigma`` the per-image, per-channel
        mean and standard deviation over H and W, detached as in the paper, and
        ``mu_mix = lam * mu + (1 - lam) * mu[perm]`` (the same for ``sigma``).
    """
    f = x.float()
    mu = f.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (f.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    w = lam.float().view(-1, 1, 1, 1)
    mu_mix = w * mu + (1 - w) * mu[perm]
    sigma_mix = w * sigma + (1 - w) * sigma[perm]
    return ((f - mu) / sigma * sigma_mix + mu_mix).to(x.dtype)


class MixStyle:
    """The forward hook: with probability ``p`` per batch, mixes the stage output's statistics.

    Parameters
    ----------
    p : float
        Probability that a training batch is mixed at this stage (the paper: 0.5).
    alpha : float, default 0.1
        The mixing weight is drawn per image from Beta(alpha, alpha).

    Notes
    -----
    Draws come from PyTorch's global generator, which the trainer seeds. The partner is a random
    permutation of the batch ("random" mixing in the paper): with several sites in a batch, most
    pairs cross sites.
    """

    def __init__(self, p: float, alpha: float = ALPHA) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"MixStyle probability must be in (0, 1], got {p}")
        self.p = float(p)
        self.beta = torch.distributions.Beta(float(alpha), float(alpha))

    def __call__(self, module: nn.Module, _inputs: object, output: object) -> Tensor | None:
        if not module.training or not isinstance(output, Tensor) or output.dim() != 4:
            return None  # evaluation, or not a feature map: the output is kept
        batch = output.shape[0]
        if batch < 2 or torch.rand(()).item() >= self.p:
            return None
        lam = self.beta.sample((batch,)).to(output.device)
        perm = torch.randperm(batch, device=output.device)
        return mix_statistics(output, lam, perm)


def mixstyle_stages(
    backbone: nn.Module, stages: list[Stage], strides: tuple[int, ...] = MIX_STRIDES
) -> list[str]:
    """The taps of the last stage at each output stride in ``strides``.

    Parameters
    ----------
    backbone : nn.Module
        The feature extractor the stage taps are paths of.
    stages : list of Stage
        Its stage map.
    strides : tuple of int, default (4, 8)
        Input side / feature side of the wanted stages.

    Returns
    -------
    list of str
        Tap paths, in stage order; a stride no stage gives is skipped.

    Notes
    -----
    Measured with one forward pass of a 64-pixel zero image in eval mode.
    """
    sides: dict[str, int] = {}
    hooks = [
        backbone.get_submodule(s.tap).register_forward_hook(_side_recorder(sides, s.tap))
        for s in stages
        if s.tap
    ]
    was_training = backbone.training
    try:
        backbone.eval()
        param = next(backbone.parameters())
        with torch.no_grad():
            backbone(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    chosen = []
    for stride in strides:
        at = [tap for tap, side in sides.items() if side * stride == _PROBE_SIDE]
        if at:
            chosen.append(at[-1])  # dict order is stage order: the deepest at this stride
    return chosen


def _side_recorder(sides: dict[str, int], tap: str):
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            sides[tap] = int(output.shape[-1])

    return hook


def attach_mixstyle(
    backbone: nn.Module, stages: list[Stage], p: float, alpha: float = ALPHA
) -> list[RemovableHandle]:
    """Register MixStyle after the stride-4 and stride-8 stages of ``backbone``.

    Parameters
    ----------
    backbone : nn.Module
        The feature extractor (``TransferModel.backbone``).
    stages : list of Stage
        Its stage map (``TransferModel.stages``).
    p : float
        Probability of mixing a training batch at each of the stages.
    alpha : float, default 0.1
        Beta parameter of the mixing weight.

    Returns
    -------
    list of RemovableHandle
        Remove them to detach MixStyle (the model is then exactly what it was).

    Raises
    ------
    ValueError
        When no stage of the backbone has output stride 4 or 8 (MixStyle would do nothing).
    """
    taps = mixstyle_stages(backbone, stages)
    if not taps:
        raise ValueError("no stage of this backbone has output stride 4 or 8 for MixStyle")
    hook = MixStyle(p, alpha)
    return [backbone.get_submodule(tap).register_forward_hook(hook) for tap in taps]
