"""The headline sensitivity, specificity and AUC of a two-class task are for the positive class a
user means: a sensible default, settable, stored with the model, named beside the figures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SETTINGS
from PIL import Image

from medtune.errors import MedtuneError
from medtune.evaluation.labels import LabelSpace, default_positive_class
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.tables import metrics_table
from medtune.runs import RunFolder
from medtune.workflows.train import train


@pytest.mark.parametrize(
    ("names", "positive"),
    [
        (["DR", "No_DR"], "DR"),
        (["no-referral", "referral"], "referral"),
        (["0", "1"], "1"),
        (["Normal", "Glaucoma"], "Glaucoma"),
        (["benign", "malignant"], "malignant"),
        (["negative", "positive"], "positive"),
        (["cat", "dog"], "dog"),  # nothing says which is negative: the second class
    ],
)
def test_default_positive_class_is_not_the_negative_finding(names, positive):
    assert default_positive_class(names) == positive


def test_metrics_are_computed_for_the_positive_class_and_name_it():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)  # 0 = "DR", 1 = "No_DR"
    p_dr = np.clip(np.where(y == 0, 0.8, 0.2) + rng.normal(0, 0.1, 40), 0.01, 0.99)
    probs = np.column_stack([p_dr, 1 - p_dr])
    m = compute_metrics(y, probs, ["DR", "No_DR"], n_boot=0)
    assert m["positive"] == "positive class DR"
    assert m["auc"] > 0.9  # AUC of P(DR) for DR, not of P(No_DR)
    flipped = compute_metrics(
        y, probs, LabelSpace.of(["DR", "No_DR"], positive_class="No_DR"), n_boot=0
    )
    assert flipped["auc"] == pytest.approx(m["auc"])  # same ranking, other class
    assert flipped["positive"] == "positive class No_DR"
    assert "for the positive class DR" in metrics_table({"val": m})
    with pytest.raises(MedtuneError, match="'Glaucoma' is not one of the classes"):
        LabelSpace.of(["DR", "No_DR"], positive_class="Glaucoma")


def _two_class_folders(root):
    rng = np.random.default_rng(0)
    for name, colour in (("DR", 0), ("No_DR", 2)):
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            img[..., colour] += 150
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_the_positive_class_is_stored_with_the_model(tmp_path):
    data = _two_class_folders(tmp_path / "data")
    settings = {**TINY_SETTINGS, "strategy": "linear-probe", "probe_rotations": False}
    run = train(data, out=str(tmp_path / "run"), progress=False, **settings)
    assert RunFolder(run.dir).read_card().label_space.positive_class == "DR"
    assert run.metrics["val"]["positive"] == "positive class DR"
    other = train(
        data, out=str(tmp_path / "run2"), progress=False, positive_class="No_DR", **settings
    )
    assert RunFolder(other.dir).read_card().label_space.positive_class == "No_DR"
    with pytest.raises(MedtuneError, match="not one of the classes"):
        train(data, out=str(tmp_path / "bad"), progress=False, positive_class="x", **settings)
