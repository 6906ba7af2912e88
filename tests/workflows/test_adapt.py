"""``medtune adapt``: AdaBN changes only the BatchNorm running statistics of the fine-tuned
stages, writes a new run that evaluate/predict/export use, and moves the operating points only
when given labels of the new site."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, write_graded_images
from PIL import Image

from medtune.errors import MedtuneError
from medtune.runs import RunFolder
from medtune.transfer.adabn import adaptable_norms
from medtune.workflows.adapt import adapt
from medtune.workflows.evaluate import evaluate
from medtune.workflows.predict import batch_check, load_predictor, predict
from medtune.workflows.train import train

FREEZE = 4  # test_efficientnet: 7 stages, 7 BatchNorm layers adapted, 6 kept


def _site_b(root: Path, n_per_class: int = 12, labelled: bool = True, seed: int = 5) -> Path:
    """Images of a 'new site': the same two classes, brighter and with another contrast."""
    write_graded_images(root, n_per_class=n_per_class, classes=2, seed=seed)
    for path in root.rglob("*.png"):
        img = np.asarray(Image.open(path)).astype(np.float32)
        Image.fromarray(np.clip(img * 0.6 + 90, 0, 255).astype(np.uint8)).save(path)
    if not labelled:  # a flat folder of unlabelled images
        flat = root.parent / f"{root.name}-flat"
        flat.mkdir()
        for i, path in enumerate(sorted(root.rglob("*.png"))):
            path.rename(flat / f"b_{i:03d}.png")
        return flat
    return root


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("adapt")
    data = write_graded_images(tmp / "data", n_per_class=12, classes=2)
    settings = {**TINY_SETTINGS, "cache_dir": str(tmp / "cache")}
    out = tmp / "run"
    train(data=str(data), out=str(out), epochs=1, freeze=FREEZE, progress=False, **settings)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_adapt_changes_only_the_fine_tuned_batchnorm_statistics(source_run: Path, tmp_path):
    before = _digests(source_run)
    site_b = _site_b(tmp_path / "site-b", labelled=False)
    out = tmp_path / "adapted"
    result = adapt(source_run, site_b, out, batch_size=5, progress=False)

    assert _digests(source_run) == before, "the source run must not change"
    old, meta = RunFolder(source_run).load_model()
    new, new_meta = RunFolder(out).load_model()
    adapted, kept = adaptable_norms(new, FREEZE)
    assert len(adapted) == 7 and len(kept) == 6
    stats = {"running_mean", "running_var", "num_batches_tracked"}
    adapted_keys = {f"backbone.{path}.{s}" for path in adapted for s in stats}
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    for key, value in old_state.items():
        if key in adapted_keys:
            continue
        assert torch.equal(value, new_state[key]), f"{key} must not change"
    for path in adapted:
        key = f"backbone.{path}.running_mean"
        assert not torch.allclose(old_state[key], new_state[key]), f"{key} was not re-estimated"

    record = result.record
    assert record["images"] == 24 and record["layers_adapted"] == 7
    assert record["operating_points"]["moved"] is False
    assert new_meta.temperature == meta.temperature
    # without labels the validated points stay: the source's validation logits are kept
    assert (out / "val_logits.npz").read_bytes() == (source_run / "val_logits.npz").read_bytes()
    assert RunFolder(out).read_adaptation()["source_run"] == str(source_run.resolve())
    assert RunFolder(source_run).read_adaptation() is None
    assert "kept" in result.summary and "adapted 7 BatchNorm layers on 24 images" in result.summary

    # a usable run: evaluate (its home test split), predict and export
    evaluated = evaluate(out, gradcam=False, n_boot=0, progress=False)
    assert evaluated.metrics["n"] > 0
    rows = predict([str(site_b)], run=out, progress=False)
    assert len(rows) == 24
    from medtune.workflows.export import export

    exported = export(out, "onnx", str(tmp_path / "export"))
    assert exported.max_abs_diff < 1e-4


def test_thresholds_move_only_with_labels_and_evaluate_uses_the_moved_ones(
    source_run: Path, tmp_path
):
    unlabelled = _site_b(tmp_path / "site-b", labelled=False)
    sample = _site_b(tmp_path / "sample", n_per_class=12, seed=9)
    out = tmp_path / "adapted"
    result = adapt(source_run, unlabelled, out, labels=sample, batch_size=8, progress=False)

    points = result.record["operating_points"]
    assert points["moved"] is True
    assert (points["n_images"], points["n_positives"], points["n_negatives"]) == (24, 12, 12)
    sens90 = points["points"]["sens90"]
    assert sens90["sensitivity"] >= 0.9  # the validated sensitivity holds on the sample
    assert 0.0 <= sens90["sensitivity_ci95"][0] <= sens90["sensitivity"]
    assert "specificity_ci95" in sens90
    assert "using 24 labelled images (12 positives)" in result.summary
    card = RunFolder(out).read_card()
    assert card.temperature == pytest.approx(points["temperature"]["to"])
    assert card.site_shift is None and card.provenance.adapted_from == str(source_run.resolve())
    val = RunFolder(out).read_val_logits()
    assert len(val["labels"]) == 24 and {"logits_none", "logits_rot90"} <= set(val)
    # evaluate chooses its operating points from val_logits.npz: the moved thresholds
    evaluated = evaluate(out, gradcam=False, n_boot=0, progress=False)
    chosen = evaluated.metrics["operating_points"]["sens90"]["threshold"]
    assert chosen == pytest.approx(sens90["to"])
    # predict's referrals with this run are at points calibrated on the site's labels
    predictor = load_predictor(run=out)
    assert predictor.batch_shift is None  # not carried over: AdaBN changed the features
    validation = batch_check(predictor, None, 30)[1]
    assert validation == {"validated": "yes", "status": "moved on 24 labelled images of this site"}


def test_adapt_refuses_probe_runs_an_existing_out_and_too_few_positives(source_run: Path, tmp_path):
    site_b = _site_b(tmp_path / "site-b", labelled=False)
    with pytest.raises(MedtuneError, match="already exists"):
        adapt(source_run, site_b, source_run.parent, progress=False)
    few = _site_b(tmp_path / "few", n_per_class=4, seed=3)
    with pytest.raises(MedtuneError, match="at least 10 positives"):
        adapt(source_run, site_b, tmp_path / "never", labels=few, progress=False)
    assert not (tmp_path / "never").exists(), "nothing is written when adapt fails"

    data = write_graded_images(tmp_path / "pdata", n_per_class=6, classes=2)
    probe = tmp_path / "probe"
    settings = {**TINY_SETTINGS, "cache_dir": str(tmp_path / "cache")}
    train(data=str(data), out=str(probe), strategy="linear-probe", progress=False, **settings)
    with pytest.raises(MedtuneError, match="probe run cannot be adapted"):
        adapt(probe, site_b, tmp_path / "probe-b", progress=False)


def test_cli_adapt_prints_one_line(source_run: Path, tmp_path, capsys):
    from medtune.cli.main import main

    site_b = _site_b(tmp_path / "site-b", labelled=False)
    code = main(
        ["adapt", "--run", str(source_run), "--data", str(site_b), "--out", str(tmp_path / "b")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("adapted 7 BatchNorm layers on 24 images; operating points kept")


def test_points_moved_on_a_sample_unlike_the_site_are_not_validated(source_run: Path, tmp_path):
    """A labelled sample that is not a random sample of the site (here half referable where the
    site is one eighth) moves the points but leaves them marked "not validated here"."""
    import shutil

    sample = _site_b(tmp_path / "sample", n_per_class=12, seed=9)
    site = tmp_path / "site"
    shutil.copytree(sample, site)
    more = _site_b(tmp_path / "negatives", n_per_class=72, seed=11)
    for i, path in enumerate(sorted((more / "0").glob("*.png"))):
        shutil.copy(path, site / "0" / f"extra_{i:03d}.png")
    out = tmp_path / "adapted"
    result = adapt(source_run, site, out, labels=sample, batch_size=8, progress=False)
    check = result.record["operating_points"]["random_sample"]
    assert (check["n_sample"], check["n_site"]) == (24, 72) and check["random"] is False
    assert check["sample_images_among_the_site"] == 24
    assert result.record["operating_point_status"]["validated"] is False
    assert "not a random sample of the site" in result.summary
    validation = batch_check(load_predictor(run=out), None, 30)[1]
    assert validation["validated"] == "no" and "not a random sample" in validation["status"]


def test_summary_of_a_shifted_site_says_whether_its_points_were_calibrated_there():
    from medtune.evaluation.shift import _verdict
    from medtune.workflows.adapt import AdaptResult

    shift = _verdict(1e-9, "validation (all sites)", 1e-9, 0.5, 100, 0.05)
    record = {
        "layers_adapted": 7,
        "images": 100,
        "batch_shift": shift,
        "operating_points": {"moved": False},
        "operating_point_status": {"validated": False, "status": "not validated"},
    }
    assert shift["message"] in AdaptResult(Path("x"), record).summary
    record["operating_point_status"] = {"validated": True, "status": "moved on 40 labelled"}
    summary = AdaptResult(Path("x"), record).summary
    assert "not validated here" not in summary and "moved on its labels" in summary


def test_label_free_recalibration_suggestions_and_the_batch_verdict(source_run: Path, tmp_path):
    import pandas as pd

    from medtune.evaluation.label_free import NOT_VALIDATED

    site_b = _site_b(tmp_path / "site-b", labelled=False)
    out = tmp_path / "b"
    result = adapt(
        source_run,
        site_b,
        out,
        recalibrate="quantile",
        suggest=7,
        batch_size=8,
        progress=False,
    )
    record = result.record
    assert record["batch_shift"]["n_images"] == 24
    assert isinstance(record["batch_shift"]["shifted"], bool)
    assert record["operating_point_status"]["validated"] is False
    assert "not validated here" in result.summary
    # model.json carries the moved thresholds and their status to predict and evaluate
    ops = RunFolder(out).read_card().operating_points
    assert ops.label_free == "quantile" and ops.status.startswith(NOT_VALIDATED)
    assert ops.validated is False
    moved = ops.at("none", "sens90")
    assert moved.threshold != pytest.approx(moved.validated_threshold, abs=1e-9)
    rows = predict([str(site_b)], run=out)
    assert len(rows) == 24  # predict reads the moved points
    assert batch_check(load_predictor(run=out), None, 30)[1]["validated"] == "no"  # marked
    labelled = _site_b(tmp_path / "b-labelled", seed=5)
    scored = evaluate(out, str(labelled), gradcam=False, n_boot=0, progress=False)
    assert scored.metrics["label_free_operating_points"]["sens90"]["threshold"] == pytest.approx(
        moved.threshold
    )
    # the suggestions: 7 distinct images of the site, the most uncertain first
    suggested = pd.read_csv(out / "suggested.csv")
    assert len(suggested) == 7 == suggested["image"].nunique()
    assert suggested["rank"].tolist() == list(range(1, 8))
    assert suggested["uncertainty"].iloc[0] == suggested["uncertainty"].max()
    assert all(Path(p).parent == site_b for p in suggested["image"])
    with pytest.raises(MedtuneError, match="recalibrate 'median' is unknown"):
        adapt(source_run, site_b, tmp_path / "c", recalibrate="median", progress=False)


def test_finetune_on_the_sample_keeps_the_home_figures(source_run: Path, tmp_path):
    from medtune.runs import RunFolder as Folder

    site_b = _site_b(tmp_path / "site-b", labelled=False)
    sample = _site_b(tmp_path / "sample", n_per_class=12, seed=9)
    with pytest.raises(MedtuneError, match="finetune needs labels"):
        adapt(source_run, site_b, tmp_path / "x", finetune=True, progress=False)
    out = tmp_path / "tuned"
    result = adapt(
        source_run, site_b, out, labels=sample, finetune=True, batch_size=8, progress=False
    )
    tuned = result.record["finetune"]
    assert tuned["n_sample"] == 24 and tuned["images_drawn"] == 3 * 4 * 24
    home = tuned["home"]
    assert home["before"]["accuracy"] == pytest.approx(
        Folder(source_run).read_metrics()["val"]["accuracy"]
    )
    # no forgetting at home on this easy two-class set: accuracy and AUC stay within 0.15
    for key in ("accuracy", "auc"):
        assert home["after"][key] >= home["before"][key] - 0.15, (key, home)
    # only the head and the last stage trained: an early stage's weights are the source's
    src_model, _ = Folder(source_run).load_model()
    new_model, _ = Folder(out).load_model()
    first = [p for n, p in src_model.named_parameters() if "blocks.0" in n][0]
    first_new = [p for n, p in new_model.named_parameters() if "blocks.0" in n][0]
    assert torch.equal(first, first_new)
    head = dict(src_model.named_parameters())
    changed = [n for n, p in new_model.named_parameters() if not torch.equal(p, head[n])]
    assert changed and all("blocks.0" not in n for n in changed)
    # RUN/model.onnx is the tuned model's graph (reused from its scorer), not the AdaBN one's
    from medtune.deploy.engine import run_scorer

    size = Folder(out).read_card().input_spec.image_size
    x = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    onnx_logits = run_scorer(Folder(out), engine="onnx").logits(x)
    torch_logits = run_scorer(Folder(out), engine="torch").logits(x)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4


def test_site_images_pair_fellow_eyes_by_file_name_for_the_batch_test(tmp_path):
    """adapt's batch verdict counts patients as predict does (file names, no manifest)."""
    from medtune.workflows.new_site import site_patients

    sources = [tmp_path / "3_left.png", str(tmp_path / "3_right.jpeg"), tmp_path / "x.png"]
    assert site_patients([*sources, np.zeros((4, 4, 3), np.uint8)]) == ["3", "3", None, None]
