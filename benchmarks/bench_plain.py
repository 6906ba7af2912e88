"""A plain PyTorch/timm loop as a typical tutorial writes it.

torchvision ``ImageFolder`` decoding every file with PIL on every epoch, per-item transforms
(resize, random flip, to-tensor, normalise), ``DataLoader(num_workers=2)``, fp32, the default
(contiguous) memory layout, SGD with momentum, cross-entropy; validation each epoch.
The network is medtune's Lite0 body (same weights) with a new linear layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from benchlib import Clock, Spec, median_time, qwk, say

WORKERS = 2


IMPORTS = ("torchvision", "medtune.models")


def _transforms(spec: Spec, mean, std, train: bool):  # noqa: ANN001
    from torchvision import transforms as T

    steps = [T.Resize((spec.image_size, spec.image_size))]
    if train:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _loader(spec: Spec, folder: str, train: bool, mean, std):  # noqa: ANN001
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(folder, transform=_transforms(spec, mean, std, train))
    return DataLoader(ds, batch_size=spec.batch_size, shuffle=train, num_workers=WORKERS)


def _model(n_classes: int):
    from medtune.models import create_backbone

    backbone = create_backbone("efficientnet_lite0")
    net = backbone.model.body  # the timm network, pretrained
    net.reset_classifier(n_classes)
    return net, backbone.mean, backbone.std


def _evaluate(net, loader) -> tuple[list[int], list[int]]:  # noqa: ANN001
    import torch

    net.eval()
    ys, preds = [], []
    with torch.no_grad():
        for x, y in loader:
            preds += net(x).argmax(1).tolist()
            ys += y.tolist()
    return ys, preds


def finetune(spec: Spec) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(spec.seed)
    clock = Clock()
    net, mean, std = _model(len(spec.class_names))
    train_dl = _loader(spec, spec.train_dir, True, mean, std)
    val_dl = _loader(spec, spec.val_dir, False, mean, std)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    log: list[dict[str, Any]] = []
    for epoch in range(spec.epochs):
        t_train, n = clock.now(), 0
        net.train()
        for x, y in train_dl:
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            n += len(y)
        t_val = clock.now()
        kappa = qwk(*_evaluate(net, val_dl))
        end = clock.now()
        log.append(
            {
                "epoch": epoch,
                "phase": "full",
                "train_s": t_val - t_train,
                "images": n,
                "val_s": end - t_val,
                "val_qwk": kappa,
                "t_end": end,
            }
        )
        say(f"plain epoch {epoch}: {t_val - t_train:.1f} s, qwk {kappa:.3f}")
    total = clock.now()
    torch.save(net.state_dict(), Path(spec.work) / "plain-model.pt")
    return {"epochs": log, "total_s": total, "final_val_qwk": log[-1]["val_qwk"]}


def infer(spec: Spec) -> dict[str, Any]:
    import torch

    net, mean, std = _model(len(spec.class_names))
    state = torch.load(Path(spec.work) / "plain-model.pt", weights_only=True)
    net.load_state_dict(state)
    loader = _loader(spec, spec.val_dir, False, mean, std)
    n = len(loader.dataset)

    def features() -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return np.concatenate(
                [
                    net.forward_head(net.forward_features(x), pre_logits=True).numpy()
                    for x, _ in loader
                ]
            )

    say("plain features")
    feat_s, _ = median_time(features, spec.repeats)
    say("plain predict")
    predict_s, (ys, preds) = median_time(lambda: _evaluate(net, loader), spec.repeats)
    return {
        "n_images": n,
        "features_images_per_s": n / feat_s,
        "predict_images_per_s": n / predict_s,
        "predict_qwk": qwk(ys, preds),
    }


TASKS = {"finetune": finetune, "infer": infer}
