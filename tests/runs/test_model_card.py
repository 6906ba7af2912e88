"""One description of a trained model (``ModelCard``), one label space, one JSON reader/writer:
run folders and exports written before format version 3 still load and give the same answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune.config import InputSpec
from medtune.deploy.onnx_predictor import OnnxPredictor
from medtune.errors import MedtuneError
from medtune.evaluation.card import CARD_FORMAT_VERSION, ModelCard, read_card, write_card
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.referral import referral_rule
from medtune.evaluation.scoring import score
from medtune.runs import RunFolder

#: Written by main's code before this change (tests/fixtures/cards_v2/README.md).
V2 = Path(__file__).resolve().parents[1] / "fixtures" / "cards_v2"


def test_a_version_2_run_folder_card_loads_with_typed_operating_points():
    card = RunFolder(V2 / "run").read_card()
    assert card.backbone == "efficientnet_lite0" and card.kind == "finetune"
    assert card.label_space == LabelSpace(("0", "1", "2", "3", "4"), True, None)
    assert card.input_spec == InputSpec(
        32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), {"crop": True}
    )
    assert card.temperature == 1.3 and card.dropout == 0.2 and card.synthetic
    assert card.decoding == {"method": "expected_grade", "thresholds": [0.5, 1.4, 2.6, 3.5]}
    ops = card.operating_points
    assert ops.positive_classes == (2, 3, 4) and ops.n_val == 60
    assert ops.at("rot90", "sens90").threshold == 0.31 and ops.at("none", "sens97.5") is None
    assert card.export is None and card.site_shift is None
    rule = referral_rule(card.label_space, ops, "youden", "none")
    assert rule.threshold == 0.5 and rule.positive == (2, 3, 4)
    assert rule.validated["specificity_ci"] == [0.6, 0.78]


def test_a_version_1_run_folder_card_loads():
    card = RunFolder(V2 / "run_v1").read_card()
    assert card.input_spec.image_size == 32 and card.operating_points is None


def test_one_default_positive_class_everywhere():
    """["DR", "No_DR"] without a stored positive class: DR for metrics AND for referral."""
    card = RunFolder(V2 / "run_two_class").read_card()
    space = card.label_space
    assert space.positive_class == "DR" and space.referral_classes == (0,)
    assert space.binary_task.positive == (0,) and space.referral_name == "positive class DR"
    rule = referral_rule(space, None)
    assert rule.positive == (0,)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    metrics = compute_metrics([0, 1, 0, 1], probs, space, n_boot=0)
    assert metrics["positive"] == "positive class DR"
    assert metrics["binary_task"]["positive_class_indices"] == [0]
    assert LabelSpace.of(["DR", "No_DR"]) == space  # the same default from the bare names


def test_an_export_written_before_version_3_gives_the_same_answers(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(V2 / "export", export)
    expected = np.load(V2 / "export_expected.npz")
    predictor = OnnxPredictor(export, num_threads=1)
    card = predictor.card
    assert card.export.format == "onnx" and card.export.opset == 17
    assert card.export.parity["n_images"] == 4 and card.export.features_name == "features"
    assert card.site_shift.file == "site_shift.npz" and card.site_shift.threshold > 0
    images = expected["images"]
    scored = score(predictor, images)
    logits, shift_scores = scored.logits, scored.shift_scores
    # normalisation by lookup table (medtune.data.normalise) moves the last float32 bit only
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(shift_scores, expected["shift_scores"], rtol=1e-5)
    np.testing.assert_allclose(predictor.predict_proba(images), expected["probs"], atol=1e-6)
    rot = predictor.predict_proba(images, tta="rot90")
    np.testing.assert_allclose(rot, expected["probs_rot90"], atol=1e-6)
    np.testing.assert_array_equal(predictor.predict(images).labels, expected["labels"])


def test_cards_round_trip_and_are_written_as_version_3(tmp_path):
    for name in ("run", "run_two_class", "export"):
        card = read_card(V2 / name / "model.json")
        path = write_card(tmp_path / f"{name}.json", card)
        values = json.loads(path.read_text())
        assert values["format_version"] == CARD_FORMAT_VERSION
        assert values["provenance"]["medtune_version"]
        again = read_card(path)
        assert again.replace(provenance=card.provenance) == card
    values = json.loads((tmp_path / "export.json").read_text())
    assert values["export"]["model_file"] == "model.onnx" and "model_file" not in values
    assert values["site_shift"]["file"] == "site_shift.npz"


def test_bad_cards_fail_with_one_line_naming_the_file(tmp_path):
    good = json.loads((V2 / "run" / "model.json").read_text())
    cases = {
        "unknown": ({**good, "colour": "red"}, "unknown field"),
        "classes": ({**good, "class_names": ["only"]}, "at least two class names"),
        "size": ({**good, "image_size": 0}, "positive integer"),
        "std": ({**good, "std": [0.2, 0.0, 0.2]}, "positive"),
        "temperature": ({**good, "temperature": -1}, "temperature"),
        "decoding": ({**good, "decoding": {"method": "mode"}}, "decoding method"),
        "positive": ({**good, "class_names": ["a", "b"], "positive_class": "c"}, "not one"),
    }
    for name, (values, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        with pytest.raises(MedtuneError, match=message) as err:
            read_card(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MedtuneError, match="cannot parse"):
        read_card(tmp_path / "broken.json")
    with pytest.raises(MedtuneError, match="no trained model here"):
        RunFolder(tmp_path).read_card()


def test_an_old_sidecar_keeps_working_with_extra_keys_and_a_version_3_card_does_not():
    old = json.loads((V2 / "export" / "model.json").read_text())
    card = ModelCard.from_dict({**old, "notes": "kept by the old exporter"}, "old sidecar")
    assert card.export.model_file == "model.onnx"
    new = card.to_dict()
    with pytest.raises(MedtuneError, match="unknown field"):
        ModelCard.from_dict({**new, "notes": "x"}, "new card")


def test_an_exports_card_cannot_rebuild_a_run(tmp_path):
    shutil.copy(V2 / "export" / "model.json", tmp_path / "model.json")
    card = RunFolder(tmp_path).read_card()
    assert card.backbone == "efficientnet_lite0"
    bare = card.replace(backbone=None)
    RunFolder(tmp_path).write_card(bare)
    with pytest.raises(MedtuneError, match="export's card, not a run's"):
        RunFolder(tmp_path).load_model()
