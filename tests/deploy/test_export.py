"""Export (ONNX / TorchScript), parity check, sidecar and the torch-free ONNX predictor."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medtune.config import InputSpec
from medtune.data.normalise import normalise_images
from medtune.deploy import OnnxPredictor, export_model
from medtune.deploy import exporter as exporter_mod
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature as softmax
from medtune.evaluation.card import ModelCard
from medtune.evaluation.decoding import decode, expected_grade
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.scoring import score

SIZE = 32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GRADES = ["0", "1", "2", "3", "4"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def real_like_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Fundus-like uint8 images: dark background, bright disc, smooth shading, spots, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.4, 0.6, size=2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(0.15, 0.22)
        shade = 0.6 + 0.4 * np.sin(3 * xx + rng.uniform(0, 3)) * np.cos(2 * yy)
        base = np.stack([180 * shade, 90 * shade, 40 * shade], axis=-1) * disc[..., None]
        for _ in range(3):
            sy, sx = rng.uniform(0.3, 0.7, size=2)
            spot = np.exp(-(((yy - sy) ** 2 + (xx - sx) ** 2) / 0.002))
            base += spot[..., None] * np.array([60.0, 30.0, 10.0])
        base += rng.normal(0, 4, size=base.shape)
        out[i] = np.clip(base, 0, 255).astype(np.uint8)
    return out


class TinyNet(nn.Module):
    """Small CNN with BatchNorm (non-trivial running stats) and a 5-class head."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, k)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FixedLogits(nn.Module):
    """Returns the same logits for every image (input only sets the batch size)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * 0.0 + self.logits


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's medtune; must succeed."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def torch_probs(model: nn.Module, images: np.ndarray, temperature: float) -> np.ndarray:
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(normalise_images(images, MEAN, STD))).numpy()
    return softmax(logits, temperature)


def make_card(
    size: int = SIZE,
    *,
    class_names: list[str] = GRADES,
    temperature: float = 1.5,
    decoding: dict | None = None,
    fundus: dict | None = None,
) -> ModelCard:
    """A bare module's card: ungraded classes, no fundus preprocessing unless asked."""
    return ModelCard(
        LabelSpace.of(class_names, ordinal=False),
        InputSpec(size, MEAN, STD, fundus or {"crop": False}),
        temperature=temperature,
        decoding=decoding or {"method": "argmax"},
    )


def do_export(model: nn.Module, out: Path, fmt: str = "onnx", size: int = SIZE, **card):
    return export_model(
        model, out, make_card(size, **card), fmt=fmt, parity_inputs=real_like_images(4, size)
    )


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def onnx_dir(tiny: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    do_export(tiny, out, fundus=None)
    return out


# --------------------------------------------------------------------------------------------
# export + parity
# --------------------------------------------------------------------------------------------


def test_onnx_export_timm_parity(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=5)
    res = do_export(model, tmp_path, size=64)
    print(
        f"timm efficientnet_lite0 64px ONNX parity: max_abs_diff={res.max_abs_diff:.3g}, "
        f"logits {res.max_abs_logit_diff:.3g}"
    )
    assert res.max_abs_diff <= 1e-4
    assert res.model_path == tmp_path / "model.onnx" and res.n_parity_images == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]
    proto = onnx.load(str(res.model_path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    # the deployed predictor agrees with PyTorch on fresh images, at another batch size
    imgs = real_like_images(3, 64, seed=7)
    got = OnnxPredictor(tmp_path, num_threads=1).predict_proba(imgs)
    assert np.abs(got - torch_probs(model, imgs, 1.5)).max() <= 1e-4
    assert not model.training


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated
def test_torchscript_export_parity(tiny: TinyNet, tmp_path: Path) -> None:
    res = do_export(tiny, tmp_path, fmt="torchscript")
    print(f"TinyNet TorchScript parity: max_abs_diff={res.max_abs_diff:.3g}")
    assert res.max_abs_diff <= 1e-4 and res.fmt == "torchscript"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.ts"]
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    imgs = real_like_images(3, SIZE, seed=3)
    assert np.abs(torch_probs(loaded, imgs, 1.5) - torch_probs(tiny, imgs, 1.5)).max() <= 1e-6
    assert json.loads((tmp_path / "model.json").read_text())["export"]["format"] == "torchscript"


def test_onnx_dynamo_exporter(tiny: TinyNet, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    res = export_model(
        tiny,
        tmp_path,
        make_card(),
        parity_inputs=real_like_images(4, SIZE),
        onnx_exporter="dynamo",
    )
    print(f"TinyNet ONNX (dynamo exporter) parity: max_abs_diff={res.max_abs_diff:.3g}")
    assert res.max_abs_diff <= 1e-4 and res.card.export.onnx_exporter == "dynamo"
    assert res.card.export.opset >= 18
    imgs = real_like_images(3, SIZE, seed=8)
    got = OnnxPredictor(tmp_path, num_threads=1).predict_proba(imgs)
    assert np.abs(got - torch_probs(tiny, imgs, 1.5)).max() <= 1e-4


def test_export_uses_eval_mode_and_restores_training(tmp_path: Path) -> None:
    model = TinyNet().train()
    stats = model.body[1].running_mean.clone()
    res = do_export(model, tmp_path)
    assert res.max_abs_diff <= 1e-4
    assert model.training  # caller's mode restored
    assert torch.equal(model.body[1].running_mean, stats)  # BN stats untouched (eval export)


def test_sidecar_fields(onnx_dir: Path) -> None:
    meta = json.loads((onnx_dir / "model.json").read_text())
    from medtune import __version__

    assert meta["format_version"] == 3
    assert meta["image_size"] == SIZE
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert meta["class_names"] == GRADES
    assert meta["temperature"] == 1.5
    assert meta["decoding"] == {"method": "argmax"}
    assert meta["fundus"] == {"crop": False}
    export = meta["export"]  # the export-only facts, nested
    assert export["input_layout"] == "NCHW float32 RGB normalised"
    assert export["input_name"] == "image" and export["output_name"] == "logits"
    assert export["format"] == "onnx" and export["model_file"] == "model.onnx"
    assert export["medtune_version"] == __version__
    assert export["opset"] >= 17 and export["onnx_exporter"] in ("legacy", "dynamo")
    assert export["parity"]["max_abs_diff"] <= 1e-4 and export["parity"]["n_images"] == 4
    assert export["features_name"] is None and meta["site_shift"] is None


def _perturbed(fn):
    """Wrap an export function so it exports a copy of the model with a shifted head bias."""

    def wrapper(net, *args, **kwargs):
        import copy

        bad = copy.deepcopy(net)
        with torch.no_grad():
            bad.head.bias[0] += 2.0
        return fn(bad, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_failure_raises(
    fmt: str, tiny: TinyNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fmt == "onnx":
        patched = {k: _perturbed(v) for k, v in exporter_mod._EXPORTERS.items()}
        monkeypatch.setattr(exporter_mod, "_EXPORTERS", patched)
    else:
        monkeypatch.setattr(
            exporter_mod, "_export_torchscript", _perturbed(exporter_mod._export_torchscript)
        )
    with pytest.raises(MedtuneError, match=r"parity check failed.*differ from PyTorch by \d"):
        do_export(tiny, tmp_path, fmt=fmt)
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no temp file


def test_bad_arguments_raise(tiny: TinyNet, tmp_path: Path) -> None:
    imgs = real_like_images(2, SIZE)
    with pytest.raises(MedtuneError, match="format"):
        export_model(tiny, tmp_path, make_card(), fmt="tflite", parity_inputs=imgs)
    with pytest.raises(MedtuneError, match="class names"):
        export_model(tiny, tmp_path, make_card(class_names=["a", "b"]), parity_inputs=imgs)
    with pytest.raises(MedtuneError, match="thresholds"):
        dec = {"method": "expected_grade", "thresholds": [0.5, 1.5]}
        export_model(tiny, tmp_path, make_card(decoding=dec), parity_inputs=imgs)
    with pytest.raises(MedtuneError, match="parity inputs"):
        export_model(tiny, tmp_path, make_card(), parity_inputs=imgs.astype(np.float32))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# predictor
# --------------------------------------------------------------------------------------------


def test_predictor_runs_without_torch(tiny: TinyNet, onnx_dir: Path, tmp_path: Path) -> None:
    imgs = real_like_images(3, SIZE, seed=11)
    np.save(tmp_path / "imgs.npy", imgs)
    Image.fromarray(real_like_images(1, 48, seed=5)[0]).save(tmp_path / "big.png")
    code = (
        "import json, sys, numpy as np\n"
        "from medtune.deploy import OnnxPredictor\n"
        f"p = OnnxPredictor({str(onnx_dir)!r}, num_threads=1)\n"
        f"pred = p.predict(np.load({str(tmp_path / 'imgs.npy')!r}))\n"
        f"from_path = p.predict([{str(tmp_path / 'big.png')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps({'probs': pred.probs.tolist(), 'labels': pred.labels.tolist(),"
        " 'path_shape': list(from_path.probs.shape)}))\n"
    )
    proc = run_python(code)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = torch_probs(tiny, imgs, 1.5)
    assert np.abs(np.array(out["probs"]) - ref).max() <= 1e-4
    assert out["labels"] == ref.argmax(1).tolist()
    assert out["path_shape"] == [1, 5]


def test_dynamic_batch(onnx_dir: Path, tiny: TinyNet) -> None:
    pred = OnnxPredictor(onnx_dir / "model.onnx", num_threads=1)
    imgs = real_like_images(3, SIZE, seed=2)
    p3 = pred.predict(imgs)
    p1 = pred.predict(imgs[1])  # single H x W x 3 image
    assert p3.probs.shape == (3, 5) and p1.probs.shape == (1, 5)
    assert np.allclose(p3.probs.sum(1), 1.0)
    assert np.abs(p1.probs[0] - p3.probs[1]).max() <= 1e-5
    assert np.abs(p3.probs - torch_probs(tiny, imgs, 1.5)).max() <= 1e-4
    with pytest.raises(MedtuneError, match="input size"):
        pred.predict(real_like_images(1, SIZE + 4))


def test_rot90_tta_averages_logits(onnx_dir: Path, tiny: TinyNet) -> None:
    pred = OnnxPredictor(onnx_dir, num_threads=1)
    imgs = real_like_images(2, SIZE, seed=4)
    x = torch.from_numpy(normalise_images(imgs, MEAN, STD))
    with torch.no_grad():
        mean_logits = torch.stack([tiny(torch.rot90(x, k, dims=(2, 3))) for k in range(4)]).mean(0)
    ref = softmax(mean_logits.numpy(), 1.5)
    assert np.abs(pred.predict_proba(imgs, tta="rot90") - ref).max() <= 1e-4
    with pytest.raises(MedtuneError, match="tta"):
        pred.predict(imgs, tta="flip")


def test_expected_grade_decoding_in_predictor(tmp_path: Path) -> None:
    probs = np.array([0.42, 0.05, 0.05, 0.10, 0.38])  # argmax 0, expected grade 1.97 -> 2
    dec = {"method": "expected_grade", "thresholds": [0.5, 1.5, 2.5, 3.5]}
    model = FixedLogits(np.log(probs).tolist())
    do_export(model, tmp_path, temperature=1.0, decoding=dec)
    pred = OnnxPredictor(tmp_path, num_threads=1)
    assert pred.card.decoding == dec
    out = pred.predict(real_like_images(2, SIZE))
    assert np.allclose(out.probs, probs[None].repeat(2, 0), atol=1e-6)
    assert expected_grade(out.probs) == pytest.approx([1.97, 1.97])
    assert out.labels.tolist() == [2, 2]
    assert decode(out.probs, {"method": "argmax"}).tolist() == [0, 0]


def test_decode_thresholds_boundaries() -> None:
    dec = {"method": "expected_grade", "thresholds": [0.5, 1.5, 2.5, 3.5]}
    eye = np.eye(5)
    assert decode(eye, dec).tolist() == [0, 1, 2, 3, 4]
    half = np.array([[0.5, 0.5, 0, 0, 0], [0.3, 0.4, 0.3, 0, 0], [0, 0, 0, 0.49, 0.51]])
    assert decode(half, dec).tolist() == [1, 1, 4]  # E = 0.5 (on threshold), 1.0, 3.51
    assert math.isclose(expected_grade(half)[2], 3.51)


def test_predictor_preprocesses_paths_like_the_training_cache(tiny: TinyNet, tmp_path) -> None:
    from medtune.data import load_imageset, prepare

    do_export(tiny, tmp_path, fundus={"crop": True})
    root = tmp_path / "data"
    for i, img in enumerate(real_like_images(4, 60, seed=3)):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, 6:]).save(root / str(i % 2) / f"eye{i}.png")
    cache = prepare(load_imageset(root), SIZE, {"crop": True}, tmp_path / "cache")
    predictor = OnnxPredictor(tmp_path, num_threads=1)
    paths = [root / key for key in cache.keys]
    assert np.array_equal(predictor.prepare(paths), np.asarray(cache.images))


def test_fundus_preprocess_path_without_torch(tiny: TinyNet, tmp_path: Path) -> None:
    pytest.importorskip("medtune.data.fundus")
    do_export(tiny, tmp_path, fundus={"crop": True})
    Image.fromarray(real_like_images(1, 60, seed=9)[0]).save(tmp_path / "eye.png")
    code = (
        "import sys\n"
        "from medtune.deploy import OnnxPredictor\n"
        f"p = OnnxPredictor({str(tmp_path)!r}, num_threads=1)\n"
        f"out = p.predict([{str(tmp_path / 'eye.png')!r}])\n"
        "assert out.probs.shape == (1, 5)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run_python(code)


def test_onnx_export_with_site_shift_scores_images_without_torch(tiny: TinyNet, tmp_path) -> None:
    """The export carries the site-shift model; the torch-free predictor's scores equal the
    scores of the PyTorch features, and an image unlike the fit images scores higher."""
    from medtune.evaluation.shift import SiteShiftModel

    fit_images = real_like_images(40, SIZE, seed=21)
    with torch.no_grad():
        feats = tiny.body(torch.from_numpy(normalise_images(fit_images, MEAN, STD))).numpy()
    shift = SiteShiftModel.fit(feats[:30], feats[30:])
    out = tmp_path / "export"
    result = export_model(
        tiny, out, make_card(), fmt="onnx", parity_inputs=fit_images[:4], site_shift=shift
    )
    assert result.site_shift_path == out / "site_shift.npz"
    assert result.card.site_shift.file == "site_shift.npz"
    assert result.card.export.features_name == "features"
    cat = np.full((1, SIZE, SIZE, 3), (40, 200, 230), np.uint8)  # a flat blue-green frame
    np.save(tmp_path / "imgs.npy", np.concatenate([fit_images[30:33], cat]))
    code = (
        "import json, sys, numpy as np\n"
        "from medtune.deploy import OnnxPredictor\n"
        "from medtune.evaluation.scoring import score\n"
        f"p = OnnxPredictor({str(out)!r}, num_threads=1)\n"
        f"scores = score(p, np.load({str(tmp_path / 'imgs.npy')!r})).shift_scores\n"
        "assert not {'torch', 'sklearn'} & set(sys.modules), 'torch or sklearn was imported'\n"
        "print(json.dumps(scores.tolist()))\n"
    )
    proc = run_python(code)
    scores = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert np.allclose(scores[:3], shift.score(feats[30:33]), rtol=1e-3)
    assert scores[3] > max(shift.threshold, scores[:3].max())


def test_export_without_site_shift_has_no_features_output(onnx_dir: Path) -> None:
    pred = OnnxPredictor(onnx_dir, num_threads=1)
    assert pred.site_shift is None and pred.card.site_shift is None
    scored = score(pred, real_like_images(2, SIZE))
    logits, scores = scored.logits, scored.shift_scores
    assert logits.shape == (2, 5) and scores is None
    with pytest.raises(MedtuneError, match="no 'features' output; re-export"):
        pred.logits_and_features(real_like_images(1, SIZE))
