"""Backbones, stage maps, taps and the transfer head; no network access needed."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import imagenet_probs
from skimage import data

from medtune.errors import MedtuneError
from medtune.models import (
    StageTaps,
    TransferModel,
    create_backbone,
    load_state_dict_file,
    param_stage_index,
    stage_parameters,
)
from medtune.models.backbones import (
    LITE0_ARCH,
    convert_lukemelas_lite0,
    lite_package_weights,
)

LITE0_STAGES = ["stem"] + [f"blocks.{i}" for i in range(7)] + ["conv_head"]
LITE0_CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]
GOOGLENET_STAGES = (
    ["conv1", "conv2", "conv3", "inception3a", "inception3b"]
    + [f"inception4{c}" for c in "abcde"]
    + ["inception5a", "inception5b"]
)
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return create_backbone("efficientnet_lite0")


def _assert_every_param_in_one_stage(backbone):
    index = param_stage_index(backbone)
    assert set(index) == {n for n, _ in backbone.model.named_parameters()}
    assert all(0 <= i < len(backbone.stages) for i in index.values())
    counted = sum(len(stage_parameters(backbone.model, s)) for s in backbone.stages)
    assert counted == len(index)


# --------------------------------------------------------------------------- Lite0 weights


def test_lite0_real_weights_classify_cat(lite0):
    probs = imagenet_probs(lite0, data.chelsea())
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs.max()) > 0.3
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


def test_lite0_real_weights_classify_coffee(lite0):
    probs = imagenet_probs(lite0, data.coffee())
    assert int(probs.argmax()) in (ESPRESSO, CUP)
    assert float(probs.max()) > 0.8


def test_lite0_config_and_bn_conventions(lite0):
    assert lite0.name == "efficientnet_lite0"
    assert (lite0.image_size, lite0.num_features) == (224, 1280)
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    bns = [m for m in lite0.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert not lite0.model.training


def test_lite0_mapping_fails_loudly_on_a_wrong_shape():
    path = lite_package_weights()
    state = load_state_dict_file(path)
    net = timm.create_model(LITE0_ARCH)
    key = "_blocks.3._project_conv.weight"
    bad = dict(state)
    bad[key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(MedtuneError, match="does not match"):
        convert_lukemelas_lite0(bad, net, path)
    fewer = {k: v for k, v in state.items() if k != key}
    with pytest.raises(MedtuneError, match="tensors but EfficientNet-Lite0 has"):
        convert_lukemelas_lite0(fewer, net, path)


def test_lite0_accepts_the_packaged_file_as_weights_path(lite0, tmp_path):
    state = load_state_dict_file(lite_package_weights())
    no_counters = {
        k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "lite0.safetensors"
    from safetensors.torch import save_file

    save_file(no_counters, str(path))
    again = create_backbone("efficientnet_lite0", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.imagenet_logits(x), lite0.imagenet_logits(x))


# --------------------------------------------------------------------------- stage maps


def test_lite0_stage_map(lite0):
    assert [s.name for s in lite0.stages] == LITE0_STAGES
    assert [s.channels for s in lite0.stages] == LITE0_CHANNELS
    assert lite0.stages[-1].modules == ["body.conv_head", "body.bn2"]
    _assert_every_param_in_one_stage(lite0)


def test_googlenet_stage_map():
    backbone = create_backbone("googlenet", weights=None)
    assert [s.name for s in backbone.stages] == GOOGLENET_STAGES
    assert backbone.stages[-1].channels == backbone.num_features == 1024
    assert backbone.aux_heads == {} and backbone.imagenet_head is None
    assert not any("aux" in n for n, _ in backbone.model.named_parameters())
    _assert_every_param_in_one_stage(backbone)


@pytest.mark.parametrize("name", ["torchvision/resnet18", "resnet18"])
def test_resnet18_stage_map(name):
    backbone = create_backbone(name, weights=None)
    assert [s.name for s in backbone.stages] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert backbone.stages[0].modules == ["body.conv1", "body.bn1"]
    assert [s.channels for s in backbone.stages] == [64, 64, 128, 256, 512]
    _assert_every_param_in_one_stage(backbone)


def test_transfer_model_assigns_every_parameter(lite0):
    model = TransferModel(lite0, num_classes=5, dropout=0.2)
    index = model.param_stage_index()
    assert set(index) == {n for n, _ in model.named_parameters()}
    assert {n for n, i in index.items() if i == model.head_index} == {"head.weight", "head.bias"}
    assert set(index.values()) == set(range(len(lite0.stages) + 1))


# --------------------------------------------------------------------------- taps and sizes


@pytest.mark.parametrize("size", [96, 160])
def test_stage_taps_and_any_image_size(lite0, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), StageTaps(lite0, ["stem", "blocks.3", "conv_head"]) as taps:
        out = taps(x)
        again = taps(x)
    assert list(out) == ["stem", "blocks.3", "conv_head"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 32), (2, 80), (2, 1280)]
    torch.testing.assert_close(out["conv_head"], again["conv_head"])
    with torch.no_grad():
        torch.testing.assert_close(out["conv_head"], lite0.features(x))
    assert not lite0.model.body.conv_head._forward_hooks  # hooks removed


def test_stage_taps_all_stages_on_transfer_model():
    backbone = create_backbone("googlenet", weights=None)
    model = TransferModel(backbone, num_classes=3).eval()
    with torch.no_grad():
        out = StageTaps(model)(torch.randn(1, 3, 96, 96))
    assert [v.shape[1] for v in out.values()] == [s.channels for s in backbone.stages]


def test_transfer_model_forward_and_channels_last(lite0):
    model = TransferModel(lite0, num_classes=5).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        logits = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        logits_cl = model_cl(x.to(memory_format=torch.channels_last))
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, logits_cl, atol=1e-4, rtol=1e-4)
    assert model.forward_train(x)[1] == []


def test_googlenet_aux_logits_for_training():
    backbone = create_backbone("googlenet", weights=None, aux_logits=True)
    model = TransferModel(backbone, num_classes=5).train()
    logits, aux = model.forward_train(torch.randn(2, 3, 96, 96))
    assert logits.shape == (2, 5) and [a.shape for a in aux] == [(2, 5), (2, 5)]
    assert model.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    index = model.param_stage_index()
    assert all(i == model.head_index for n, i in index.items() if n.startswith("aux_heads."))
    with pytest.raises(MedtuneError, match="only available for googlenet"):
        create_backbone("torchvision/resnet18", weights=None, aux_logits=True)


# --------------------------------------------------------------------------- weight files


@pytest.fixture(scope="module")
def resnet18_net():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).eval()


def _check_loaded(backbone, net):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.imagenet_logits(x), net(x))


def test_weights_path_state_dict_round_trip(resnet18_net, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": resnet18_net.state_dict()}, path)
    backbone = create_backbone("torchvision/resnet18", weights=path)
    _check_loaded(backbone, resnet18_net)
    assert backbone.weights == str(path)


def test_weights_path_safetensors_round_trip(resnet18_net, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_net.state_dict().items()}, str(path))
    _check_loaded(create_backbone("torchvision/resnet18", weights=str(path)), resnet18_net)


def test_weights_with_another_head_load_the_body(tmp_path):
    torch.manual_seed(2)
    net = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    path = tmp_path / "r18_5.pt"
    torch.save(net.state_dict(), path)
    backbone = create_backbone("torchvision/resnet18", weights=path)
    assert backbone.imagenet_head is None
    net.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(x), net(x))
    with pytest.raises(MedtuneError, match="no ImageNet classifier"):
        backbone.imagenet_logits(x)


@pytest.mark.parametrize("with_aux", [True, False])
def test_googlenet_weights_path_uses_transform_input(tmp_path, with_aux):
    torch.manual_seed(3)
    net = torchvision.models.googlenet(
        weights=None, aux_logits=with_aux, transform_input=True, init_weights=True
    ).eval()
    path = tmp_path / "googlenet.pth"
    torch.save(net.state_dict(), path)
    backbone = create_backbone("googlenet", weights=path)
    assert backbone.model.body.transform_input
    _check_loaded(backbone, net)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(MedtuneError, match="do not fit this architecture") as err:
        create_backbone("torchvision/resnet18", weights=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class _Payload:
    """Unpickling this object creates the file ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(MedtuneError, match="refused to load") as err:
        create_backbone("torchvision/resnet18", weights=path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # the file really is malicious: an unrestricted load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_and_corrupt_weight_files(tmp_path):
    with pytest.raises(MedtuneError, match="weights file not found"):
        create_backbone("torchvision/resnet18", weights=tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(MedtuneError, match="not a readable PyTorch weights file"):
        load_state_dict_file(corrupt)
    corrupt_st = tmp_path / "corrupt.safetensors"
    corrupt_st.write_bytes(b"\x00" * 16)
    with pytest.raises(MedtuneError, match="not a readable .safetensors file"):
        load_state_dict_file(corrupt_st)


# --------------------------------------------------------------------------- names, offline


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(MedtuneError, match="unknown model 'efficientnet_lit0'") as err:
        create_backbone("efficientnet_lit0", weights=None)
    assert "did you mean" in str(err.value) and "efficientnet_lite0" in str(err.value)


def test_offline_googlenet_default_weights_give_a_clear_error(monkeypatch, tmp_path):
    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(MedtuneError) as err:
        create_backbone("googlenet")
    message = str(err.value)
    assert "\n" not in message
    assert "--weights PATH" in message
    assert "googlenet-1378be20.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
