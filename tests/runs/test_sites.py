"""Several sites in one run (split per site, figures per site) and the site-shift score of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SETTINGS
from PIL import Image

from medtune.config import TrainConfig
from medtune.data import load_imageset, make_splits
from medtune.data.preprocess import prepare_image
from medtune.deploy.engine import run_scorer
from medtune.evaluation.scoring import score
from medtune.runs import RunFolder
from medtune.workflows.evaluate import evaluate
from medtune.workflows.train import train


def _labelled_site(
    root: Path, patients: int, offset: int, seed: int, site_column: list[str] | None = None
) -> Path:
    """Two images (eyes) per patient; class 1 has a bright blob. labels.csv with patient_id."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for p in range(patients):
        label = p % 2
        for eye in ("left", "right"):
            img = rng.integers(0, 60, size=(40, 40, 3)).astype(np.int32) + offset
            if label:
                y, x = rng.integers(4, 28, size=2)
                img[y : y + 10, x : x + 10] = 250
            name = f"images/p{p:02d}_{eye}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
            rows.append({"image": name, "label": label, "patient_id": f"p{p:02d}"})
    frame = pd.DataFrame(rows)
    if site_column is not None:
        frame["site"] = [site_column[i % len(site_column)] for i in range(len(frame))]
    frame.to_csv(root / "labels.csv", index=False)
    return root


def _assert_groups_inside_one_split(keys, groups, splits) -> None:
    seen: dict[str, str] = {}
    for group, split in zip(groups, splits, strict=True):
        assert seen.setdefault(group, split) == split, f"group {group} crosses splits"


def test_site_column_splits_every_site_separately_keeping_groups_together(tmp_path):
    root = _labelled_site(tmp_path / "both", patients=40, offset=0, seed=1, site_column=["a"])
    frame = pd.read_csv(root / "labels.csv")
    frame["site"] = ["a" if i < 40 else "b" for i in range(len(frame))]  # patients 0-19 at a
    frame.to_csv(root / "labels.csv", index=False)
    imageset = load_imageset(root)
    assert sorted(set(imageset.sites)) == ["a", "b"]
    splits = make_splits(imageset, val=0.25, test=0.25, seed=0)
    _assert_groups_inside_one_split(imageset.keys, imageset.groups, splits)
    sites = np.asarray(imageset.sites)
    for site in ("a", "b"):  # each site gives images to every split, stratified within it
        for split in ("train", "val", "test"):
            chosen = (sites == site) & (splits == split)
            assert chosen.any(), (site, split)
            assert set(imageset.labels[chosen]) == {0, 1}, (site, split)


@pytest.fixture(scope="module")
def two_site_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("sites")
    a = _labelled_site(tmp / "site-a", patients=16, offset=0, seed=1)
    b = _labelled_site(tmp / "site-b", patients=16, offset=70, seed=2)
    out = tmp / "run"
    settings = {**TINY_SETTINGS, "cache_dir": str(tmp / "cache")}
    train(data=[str(a), str(b)], out=str(out), epochs=1, progress=False, **settings)
    return out, a, b


def test_two_sites_train_on_the_union_split_per_site_and_report_per_site(two_site_run):
    out, a, b = two_site_run
    splits = pd.read_csv(out / "splits.csv")
    assert len(splits) == 64
    site = splits["image"].str.split("/").str[0]
    assert set(site) == {"site-a", "site-b"}
    patient = site + "/" + splits["image"].str.extract(r"(p\d\d)_")[0]
    _assert_groups_inside_one_split(splits["image"], patient, splits["split"])
    for name in ("site-a", "site-b"):
        assert set(splits.loc[site == name, "split"]) == {"train", "val", "test"}, name

    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("val", "test"):
        per_site = metrics[part]["per_site"]
        assert set(per_site) == {"site-a", "site-b"}
        assert sum(m["n"] for m in per_site.values()) == metrics[part]["n"]
        assert all("auc" in m for m in per_site.values())
    # config.yaml keeps both sites, and reads back as a list; one site stays a string
    config = RunFolder(out).read_config()
    assert config.data == [str(a.resolve()), str(b.resolve())]
    assert TrainConfig(data=[str(a)]).data == str(a)

    evaluated = evaluate(out, gradcam=False, n_boot=0, progress=False)
    assert set(evaluated.metrics["per_site"]) == {"site-a", "site-b"}
    # the sites of the validation images travel with val_logits.npz (worst-site rule) and the
    # batch shift test compares the whole evaluated set with them
    val = RunFolder(out).read_val_logits()
    assert set(val["sites"].tolist()) == {"site-a", "site-b"}
    assert len(val["sites"]) == len(val["labels"])
    batch = evaluated.metrics["site_shift"]["batch"]
    assert batch["n_images"] == evaluated.metrics["n"] and 0.0 <= batch["p_value"] <= 1.0


def test_cli_data_given_twice_is_a_list_of_sites(tmp_path):
    from medtune.cli.commands import train_overrides
    from medtune.cli.main import build_parser

    args = build_parser().parse_args(["train", "--data", "x", "--data", "y"])
    assert train_overrides(args)["data"] == ["x", "y"]
    args = build_parser().parse_args(["train", "--data", "x"])
    assert TrainConfig(data=train_overrides(args)["data"]).data == "x"


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A linear probe on ImageNet Lite0 features (bundled weights, 64 px) of synthetic fundus
    photographs: the random tiny test network's features do not tell a cat from a fundus."""
    from medtune.data.synthetic import make_synthetic_dr

    tmp = tmp_path_factory.mktemp("shift")
    data = make_synthetic_dr(tmp / "data", n_per_grade=8, size=64, seed=0)
    settings = {
        **TINY_SETTINGS,
        "backbone": "efficientnet_lite0",
        "weights": "default",
        "image_size": 64,
        "cache_dir": str(tmp / "cache"),
    }
    out = tmp / "run"
    train(data=str(data), out=str(out), strategy="linear-probe", progress=False, **settings)
    return out, data


def test_site_shift_scores_out_of_distribution_images_above_held_out_ones(shift_run):
    from skimage.data import chelsea

    out, data = shift_run
    folder = RunFolder(out)
    shift = folder.read_site_shift()
    assert shift is not None and shift.n_train >= 2 and shift.n_features == 1280
    assert json.loads((out / "metrics.json").read_text())["model"]["site_shift"]["threshold"] > 0
    scorer = run_scorer(folder)
    assert scorer.card.site_shift.file == "site_shift.npz"  # the card names it
    assert scorer.card.site_shift.threshold == pytest.approx(shift.threshold)
    spec = scorer.card.input_spec
    splits = pd.read_csv(out / "splits.csv")
    held_out = splits.loc[splits["split"] == "test", "image"]
    images = [prepare_image(data / k, spec.image_size, spec.fundus) for k in held_out]
    size = spec.image_size
    odd = [
        prepare_image(chelsea(), size, spec.fundus),  # a cat
        np.zeros((size, size, 3), np.uint8),  # a blank frame
    ]
    scores = score(scorer, np.stack(images + odd)).shift_scores
    inside, outside = scores[: len(images)], scores[len(images) :]
    assert outside.min() > 1.2 * inside.max()
    assert (outside > shift.threshold).all()


def test_evaluate_summarises_the_site_shift_of_the_evaluated_images(shift_run, tmp_path):
    from skimage.data import chelsea

    out, _ = shift_run
    odd = tmp_path / "odd"
    (odd / "images").mkdir(parents=True)
    rows = []
    cat = chelsea()
    for i in range(6):  # six crops of the cat photo, labelled with two grades
        crop = cat[i * 20 : i * 20 + 240, i * 30 : i * 30 + 240]
        Image.fromarray(crop).save(odd / "images" / f"cat{i}.png")
        rows.append({"image": f"images/cat{i}.png", "label": 2 * (i % 2)})
    pd.DataFrame(rows).to_csv(odd / "labels.csv", index=False)
    result = evaluate(out, str(odd), gradcam=False, n_boot=0, progress=False)
    summary = result.metrics["site_shift"]
    assert summary["n_images"] == 6 and summary["n_outside"] == 6
    assert summary["warning"] is True
    assert summary["message"].startswith("100% of these images (6 of 6) lie outside")
    assert summary["batch"]["n_images"] == 6
    assert summary["batch"]["p_value"] < 0.2  # six cats against the validation fundi
    inside = evaluate(out, gradcam=False, n_boot=0, progress=False, name="home")
    assert inside.metrics["site_shift"]["share_outside"] < 0.5
    assert inside.metrics["site_shift"]["batch"]["shifted"] is False
    assert "is consistent with validation" in (inside.dir / "report.html").read_text()
