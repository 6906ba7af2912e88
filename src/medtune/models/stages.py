"""The ordered stage map of a backbone: stem first, last block last, the classifier excluded.

Stages drive layer-wise probes, per-stage learning rates and partial freezing. For timm models
they are derived from the model's own ``group_matcher`` metadata; for torchvision models from the
top-level children that hold parameters.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medtune.models.feature_extractor import BODY, FeatureExtractor

#: The input side used to probe stage outputs when the model does not state one.
_PROBE_SIZE = 224


@dataclass
class Stage:
    """One stage of a backbone.

    ``modules`` are paths relative to the model ``stage_map`` was given (or root-level parameter
    names, e.g. a ViT class token); ``tap`` is the module whose output is the stage's activation
    and ``channels`` that output's channel count.
    """

    name: str
    modules: list[str]
    channels: int
    tap: str = ""


# --------------------------------------------------------------------------- grouping


def has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _param_units(model: nn.Module) -> list[str]:
    """Owners of parameters: paths of modules with direct parameters, plus root parameter names."""
    units = [name for name, p in model._parameters.items() if p is not None]
    for name, module in model.named_modules():
        if name and any(p is not None for p in module._parameters.values()):
            units.append(name)
    return units


def _is_timm(model: nn.Module) -> bool:
    return hasattr(model, "group_matcher") and hasattr(model, "pretrained_cfg")


def _compile_matcher(matcher: dict) -> list[tuple[re.Pattern, str, int, tuple, bool]]:
    """(regex, key, ordinal, suffix, key_is_list) for every spec of a timm matcher dict."""
    compiled = []
    for ordinal, (key, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            for regex, suffix in spec:
                compiled.append((re.compile(regex), key, ordinal, tuple(suffix or ()), True))
        else:
            compiled.append((re.compile(spec), key, ordinal, (), False))
    return compiled


def _match_unit(unit: str, compiled: list) -> tuple[tuple[float, ...], str, str]:
    """Sort key, key name and label of one unit; unmatched units sort last with an empty key."""
    for regex, key, ordinal, suffix, key_is_list in compiled:
        found = regex.match(unit)
        if not found:
            continue
        captured = tuple(float(g) for g in found.groups() if g is not None)
        sort_key = (float(ordinal), *captured, *map(float, suffix))
        label = found.group(0).rstrip(".") if (captured or key_is_list) else key
        return sort_key, key, label
    return (math.inf,), "", ""


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _timm_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Groups from timm's coarse ``group_matcher``, keeping "merge into previous" specs separate.

    timm merges e.g. EfficientNet's ``conv_head``/``bn2`` into the last block group (suffix
    99999); here that spec becomes its own, last stage, since it is a distinct layer.
    """
    matcher = model.group_matcher(coarse=True)
    units = _param_units(model)
    if not isinstance(matcher, dict):
        from timm.models import group_with_matcher

        grouped = group_with_matcher(((u, None) for u in units), matcher)
        return [(_common_prefix(names) or names[0], list(names)) for names in grouped.values()]
    compiled = _compile_matcher(matcher)
    groups: dict[tuple[float, ...], list[str]] = {}
    labels: dict[tuple[float, ...], str] = {}
    for unit in units:
        sort_key, _key, label = _match_unit(unit, compiled)
        groups.setdefault(sort_key, []).append(unit)
        labels.setdefault(sort_key, label)
    result = []
    for sort_key in sorted(groups):
        names = groups[sort_key]
        label = labels[sort_key] or _common_prefix(names) or names[0]
        result.append((label, names))
    return result


def _leaf(module: nn.Module) -> bool:
    """A single layer: it has parameters but none of its children do."""
    return not any(has_params(child) for child in module.children())


def _torchvision_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Top-level children with parameters; leading single layers form ``stem``.

    A model whose body sits in one or two containers (``features``, ``trunk_output``) is expanded
    one level so that the stages are its blocks.
    """
    children = [(n, c) for n, c in model.named_children() if has_params(c)]
    if len(children) < 3:
        expanded = []
        for name, child in children:
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                expanded += [(f"{name}.{n}", c) for n, c in child.named_children() if has_params(c)]
            else:
                expanded.append((name, child))
        children = expanded
    n_leading = 0
    while n_leading < len(children) and _leaf(children[n_leading][1]):
        n_leading += 1
    groups: list[tuple[str, list[str]]] = []
    if 0 < n_leading < len(children):
        groups.append(("stem", [n for n, _ in children[:n_leading]]))
        children = children[n_leading:]
    groups += [(name, [name]) for name, _ in children]
    root_params = [n for n, p in model._parameters.items() if p is not None]
    if root_params and groups:
        groups[0] = (groups[0][0], root_params + groups[0][1])
    return groups


def _units_under(path: str, units: Iterable[str]) -> set[str]:
    return {u for u in units if u == path or u.startswith(path + ".")}


def _compress(units: list[str], group: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """Replace a group's units by the fewest module paths that cover exactly those units."""
    member = set(group)
    covering: list[str] = []
    for unit in group:
        if unit not in modules:  # a root-level parameter
            choice = unit
        else:
            parts = unit.split(".")
            choice = unit
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if _units_under(candidate, units) <= member:
                    choice = candidate
                    break
        if choice not in covering:
            covering.append(choice)
    return covering


# --------------------------------------------------------------------------- probing


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _probe_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else _PROBE_SIZE


def _probe(model: nn.Module, paths: list[str], image_size: int) -> dict[str, tuple[int, Tensor]]:
    """Run one eval-mode forward and record (completion order, output) of each module path."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, Tensor]] = {}

    def hook_for(path: str):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                seen[path] = (len(seen), tensor)

        return hook

    handles = [modules[p].register_forward_hook(hook_for(p)) for p in paths if p in modules]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _channels(tensor: Tensor) -> int:
    return int(tensor.shape[1] if tensor.ndim == 4 else tensor.shape[-1])


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The network inside a medtune feature extractor, with the prefix of its module paths."""
    if isinstance(model, FeatureExtractor):
        return getattr(model, BODY), BODY + "."
    return model, ""


def stage_map(model: nn.Module, image_size: int | None = None) -> list[Stage]:
    """Ordered stages (stem first, last block last) of a headless or full classification model.

    The classifier is excluded when it has been removed (``reset_classifier(0)`` or replaced by
    ``nn.Identity``) as :func:`~medtune.models.create_backbone` does. One eval-mode forward at
    ``image_size`` (default: the model's pretrained input size, else 224) finds each stage's
    output module and channels; batch-norm statistics are not touched.
    """
    body, prefix = _unwrap(model)
    groups = _timm_groups(body) if _is_timm(body) else _torchvision_groups(body)
    units = _param_units(body)
    modules = dict(body.named_modules())
    groups = _fold_moduleless(
        [(name, _compress(units, names, modules)) for name, names in groups], modules
    )
    paths = [p for _, mods in groups for p in mods if p in modules]
    seen = _probe(body, paths, image_size or _probe_size(body))
    stages = []
    for name, mods in groups:
        ran = [p for p in mods if p in seen]
        if not ran:
            raise RuntimeError(f"stage {name!r} ({mods}) never ran in a forward pass")
        tap = max(ran, key=lambda p: seen[p][0])
        stages.append(
            (
                seen[tap][0],
                Stage(name, [prefix + m for m in mods], _channels(seen[tap][1]), prefix + tap),
            )
        )
    stages.sort(key=lambda item: item[0])
    return _unique_names([stage for _, stage in stages])


def _fold_moduleless(
    groups: list[tuple[str, list[str]]], modules: dict[str, nn.Module]
) -> list[tuple[str, list[str]]]:
    """Move groups made only of root-level parameters (tokens, embeddings) into the first group."""
    kept = [g for g in groups if any(p in modules for p in g[1])]
    loose = [p for g in groups if g not in kept for p in g[1]]
    if loose and kept:
        kept[0] = (kept[0][0], loose + kept[0][1])
    return kept


def _unique_names(stages: list[Stage]) -> list[Stage]:
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage.name] = counts.get(stage.name, 0) + 1
    seen: dict[str, int] = {}
    for stage in stages:
        if counts[stage.name] > 1:
            seen[stage.name] = seen.get(stage.name, 0) + 1
            stage.name = f"{stage.name}.{seen[stage.name] - 1}"
    return stages


# --------------------------------------------------------------------------- parameters


def _stage_lookup(stages: Sequence[Stage]) -> dict[str, int]:
    return {path: i for i, stage in enumerate(stages) for path in stage.modules}


def _stage_of(param_name: str, lookup: dict[str, int]) -> int:
    """Index of the stage whose module path is the longest prefix of ``param_name``; -1 if none."""
    parts = param_name.split(".")
    for end in range(len(parts), 0, -1):
        index = lookup.get(".".join(parts[:end]))
        if index is not None:
            return index
    return -1


def stage_parameters(model: nn.Module, stage: Stage) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` that belong to ``stage``."""
    lookup = {path: 0 for path in stage.modules}
    return [(n, p) for n, p in model.named_parameters() if _stage_of(n, lookup) == 0]


def _module_and_stages(obj: Any) -> tuple[nn.Module, list[Stage]]:
    """(feature-extractor module, stages) of a Backbone or a TransferModel."""
    if isinstance(obj, nn.Module):
        return obj.backbone, obj.stages
    return obj.model, obj.stages


def param_stage_index(backbone: Any, *, strict: bool = True) -> dict[str, int]:
    """Stage index of every parameter of ``backbone.model`` (names relative to it).

    Parameters outside every stage get -1; with ``strict`` (the default) any such parameter
    raises ``RuntimeError``, since every body parameter must belong to a stage.
    """
    module, stages = _module_and_stages(backbone)
    lookup = _stage_lookup(stages)
    index = {name: _stage_of(name, lookup) for name, _ in module.named_parameters()}
    orphans = [name for name, i in index.items() if i < 0]
    if strict and orphans:
        raise RuntimeError(f"parameters outside every stage: {orphans[:5]} ({len(orphans)} total)")
    return index


# --------------------------------------------------------------------------- taps


def _pool(tensor: Tensor) -> Tensor:
    """Global average in float32 over spatial (4-D) or token (3-D) dimensions -> (B, C)."""
    if tensor.ndim == 4:
        return tensor.float().mean(dim=(2, 3))
    if tensor.ndim == 3:
        return tensor.float().mean(dim=1)
    return tensor.flatten(1).float()


class StageTaps:
    """Activations of chosen stages from a forward pass, via forward hooks: the one way medtune
    taps intermediate stages (layer probes, feature extraction, auxiliary heads).

    ``StageTaps(backbone, ["blocks.3", "conv_head"])(x)`` returns ``{name: (B, C)}`` pooled in
    float32. Used as a context manager the hooks stay registered, and every forward pass of the
    network (also one run by the caller, e.g. through a model that wraps it) refreshes
    :attr:`captured`. ``backbone`` is a :class:`~medtune.models.Backbone` or a
    :class:`~medtune.models.TransferModel`; ``None`` taps every stage. ``pool=False`` keeps the
    raw stage outputs instead. Gradients flow unless the caller runs it under ``no_grad``.
    """

    def __init__(
        self, backbone: Any, stage_names: Sequence[str] | None = None, *, pool: bool = True
    ) -> None:
        self.module, stages = _module_and_stages(backbone)
        by_name = {stage.name: stage for stage in stages}
        names = list(by_name) if stage_names is None else list(stage_names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise KeyError(f"unknown stage(s) {unknown}; stages are {list(by_name)}")
        self.stages = [by_name[n] for n in names]
        self.pool = pool
        self._handles: list[Any] = []
        self.captured: dict[str, Tensor] = {}
        self.output: Tensor | None = None

    def __enter__(self) -> StageTaps:
        modules = dict(self.module.named_modules())
        for stage in self.stages:
            self._handles.append(modules[stage.tap].register_forward_hook(self._hook(stage.name)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> functools.partial:
        # a partial of a bound method, not a closure: ``copy.deepcopy`` of a model that holds
        # the taps then copies the taps with it, and the copy's hooks fill the copy's dict
        return functools.partial(self._record, name)

    def _record(self, name: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None:
            self.captured[name] = _pool(tensor) if self.pool else tensor

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """Run ``x`` through the backbone and return each tapped stage's activation.

        The backbone's own output of that pass is kept in :attr:`output`.
        """
        if self.stages and not self._handles:
            with self:
                return self(x)
        self.captured = {}
        self.output = self.module(x)
        return {stage.name: self.captured[stage.name] for stage in self.stages}
