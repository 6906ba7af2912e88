"""MixStyle and DSU: change the feature statistics of training images in the early stages.

A camera or clinic shows in the per-channel mean and spread of early feature maps (their
"style"). Zhou, Yang, Qiao & Xiang 2021, "Domain generalization with MixStyle" (ICLR): replacing
an image's statistics by a random convex mix of its own and another training image's statistics
makes the later stages see styles between the training sites. Li et al. 2022, "Uncertainty
modeling for out-of-distribution generalization" (DSU, ICLR): drawing new statistics from a
Gaussian around the image's own, as wide as the statistics vary across the batch, reaches styles
beyond the mixes of those seen. Neither has parameters; both act only while training, and
inference is untouched.

Written here because no maintained package ships them: timm, torchvision and Lightning do not,
and the authors' code (``Dassl.pytorch``, the DSU repository) is research code that is not on
PyPI. Each is a forward hook on the stage outputs of :mod:`medtune.models.stages`, so it works on
any backbone whose stages give (B, C, H, W) maps.
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


def channel_statistics(f: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and standard deviation over H and W of ``f`` (B, C, H, W):
    two (B, C, 1, 1) tensors, ``eps`` added to the variance (the "style" of both papers)."""
    return f.mean(dim=(2, 3), keepdim=True), (f.var(dim=(2, 3), keepdim=True) + eps).sqrt()


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
    mu, sigma = (s.detach() for s in channel_statistics(f, eps))
    w = lam.float().view(-1, 1, 1, 1)
    mu_mix = w * mu + (1 - w) * mu[perm]
    sigma_mix = w * sigma + (1 - w) * sigma[perm]
    return ((f - mu) / sigma * sigma_mix + mu_mix).to(x.dtype)


def perturb_statistics(x: Tensor, noise: Tensor, eps: float = EPS) -> Tensor:
    """Give every image channel statistics drawn around its own (DSU).

    Parameters
    ----------
    x : Tensor, (B, C, H, W)
        Feature maps (any float dtype; computed in float32 and returned in ``x``'s dtype).
    noise : Tensor, (2, B, C, 1, 1)
        Standard normal draws for the new means (``noise[0]``) and spreads (``noise[1]``).
    eps : float, default 1e-6
        Added to each variance before the square root.

    Returns
    -------
    Tensor, (B, C, H, W)
        ``(x - mu) / sigma * gamma + beta`` with ``mu``, ``sigma`` the per-image, per-channel
        mean and standard deviation over H and W, ``beta = mu + noise[0] * s_mu`` and
        ``gamma = sigma + noise[1] * s_sigma``, where ``s_mu``, ``s_sigma`` are the standard
        deviations of ``mu`` and ``sigma`` over the batch (Li et al. 2022, eqs. 4-8; the
        statistics are not detached, as in the paper).
    """
    f = x.float()
    mu, sigma = channel_statistics(f, eps)
    s_mu = (mu.var(dim=0, keepdim=True) + eps).sqrt()
    s_sigma = (sigma.var(dim=0, keepdim=True) + eps).sqrt()
    noise = noise.to(f.dtype)
    beta, gamma = mu + noise[0] * s_mu, sigma + noise[1] * s_sigma
    return ((f - mu) / sigma * gamma + beta).to(x.dtype)


class StyleHook:
    """A forward hook that, with probability ``p`` per training batch, restyles a stage output.

    Parameters
    ----------
    p : float
        Probability that a training batch is restyled at this stage (both papers: 0.5).

    Notes
    -----
    Draws come from PyTorch's global generator, which the trainer seeds. Evaluation-mode passes,
    outputs that are not (B, C, H, W) maps and batches of one image are left as they are.
    """

    name = "style"

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"{self.name} probability must be in (0, 1], got {p}")
        self.p = float(p)

    def __call__(self, module: nn.Module, _inputs: object, output: object) -> Tensor | None:
        if not module.training or not isinstance(output, Tensor) or output.dim() != 4:
            return None  # evaluation, or not a feature map: the output is kept
        if output.shape[0] < 2 or torch.rand(()).item() >= self.p:
            return None
        return self.restyle(output)

    def restyle(self, x: Tensor) -> Tensor:
        """The new feature maps of a batch, (B, C, H, W)."""
        raise NotImplementedError


class MixStyle(StyleHook):
    """MixStyle (Zhou et al. 2021): mixes every image's statistics with a random partner's.

    Parameters
    ----------
    p : float
        Probability that a training batch is mixed at this stage (the paper: 0.5).
    alpha : float, default 0.1
        The mixing weight is drawn per image from Beta(alpha, alpha).

    Notes
    -----
    The partner is a random permutation of the batch ("random" mixing in the paper): with
    several sites in a batch, most pairs cross sites.
    """

    name = "MixStyle"

    def __init__(self, p: float, alpha: float = ALPHA) -> None:
        super().__init__(p)
        self.beta = torch.distributions.Beta(float(alpha), float(alpha))

    def restyle(self, x: Tensor) -> Tensor:
        lam = self.beta.sample((x.shape[0],)).to(x.device)
        perm = torch.randperm(x.shape[0], device=x.device)
        return mix_statistics(x, lam, perm)


class DSU(StyleHook):
    """DSU (Li et al. 2022): draws every image's statistics around its own.

    Parameters
    ----------
    p : float
        Probability that a training batch is perturbed at this stage (the paper: 0.5).
    """

    name = "DSU"

    def restyle(self, x: Tensor) -> Tensor:
        noise = torch.randn((2, x.shape[0], x.shape[1], 1, 1), device=x.device)
        return perturb_statistics(x, noise)


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


def attach_style(
    backbone: nn.Module, stages: list[Stage], hook: StyleHook
) -> list[RemovableHandle]:
    """Register a style hook (:class:`MixStyle`, :class:`DSU`) after the stride-4 and stride-8
    stages of ``backbone``.

    Parameters
    ----------
    backbone : nn.Module
        The feature extractor (``TransferModel.backbone``).
    stages : list of Stage
        Its stage map (``TransferModel.stages``).
    hook : StyleHook
        What to do there, and with which probability per training batch.

    Returns
    -------
    list of RemovableHandle
        Remove them to detach the hook (the model is then exactly what it was).

    Raises
    ------
    ValueError
        When no stage of the backbone has output stride 4 or 8 (the hook would do nothing).

    Notes
    -----
    Both papers' ResNet setting restyles early stages (MixStyle after res1-2; DSU at more
    positions, up to the last block): DSU here uses MixStyle's two stages, a like-for-like
    comparison of the two.
    """
    taps = mixstyle_stages(backbone, stages)
    if not taps:
        raise ValueError(f"no stage of this backbone has output stride 4 or 8 for {hook.name}")
    return [backbone.get_submodule(tap).register_forward_hook(hook) for tap in taps]


def attach_mixstyle(
    backbone: nn.Module, stages: list[Stage], p: float, alpha: float = ALPHA
) -> list[RemovableHandle]:
    """Register MixStyle (probability ``p``, Beta(``alpha``, ``alpha``) weights) as
    :func:`attach_style` does; returns the handles that detach it."""
    return attach_style(backbone, stages, MixStyle(p, alpha))
