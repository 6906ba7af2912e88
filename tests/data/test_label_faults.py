"""Labels, class names and splits that silently changed the task (issue 23, items 2-5).

2. a DR grade word among numeric grades, 3. class names that differ between splits (or sites),
4. an empty class folder in a validation/test set, 5. small sites and split fractions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medtune.data import load_imageset, make_splits
from medtune.data.grade_words import dr_grade_of
from medtune.data.sources import load_sites
from medtune.errors import MedtuneError


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # random pixels: never byte-identical to another image


def _csv_set(root: Path, labels: list[str]) -> Path:
    lines = ["image,label"]
    for i, label in enumerate(labels):
        _png(root / f"eye{i}.png", i)
        lines.append(f"eye{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / name / f"{i}.png", seed * 1000 + k * 100 + i)
    return root


def _one_line_error(src: Path, **kwargs: object) -> str:
    with pytest.raises(MedtuneError) as info:
        load_imageset(src, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------- 2. grade words among numbers


@pytest.mark.parametrize(
    ("word", "grade"),
    [("Moderate", "2"), ("moderate npdr", "2"), ("Proliferate_DR", "4"), ("No DR", "0")],
)
def test_grade_word_among_numeric_grades_is_read_as_its_grade(tmp_path, caplog, word, grade):
    data = _csv_set(tmp_path, ["0", "0", "2", "2", "4", "4", word, word])
    with caplog.at_level(logging.WARNING):
        s = load_imageset(data)
    assert s.class_names == ["0", "2", "4"]  # no class named after the word
    assert [s.class_names[k] for k in s.labels[-2:]] == [grade, grade]
    assert f"'{word}' -> {grade}" in caplog.text  # the mapping is said


def test_unknown_word_among_numeric_grades_is_refused_naming_the_row(tmp_path):
    data = _csv_set(tmp_path, ["0", "0", "2", "2", "2", "Modrate", "0"])
    msg = _one_line_error(data)
    assert str(data / "labels.csv") in msg and "row 7" in msg and "'Modrate'" in msg
    assert "Moderate=2" in msg  # says which words would be read


def test_grade_word_with_numbers_that_are_not_grades_is_refused(tmp_path):
    data = _csv_set(tmp_path, ["0", "0", "7", "7", "Moderate", "Moderate"])
    msg = _one_line_error(data)
    assert "'Moderate'" in msg and "not DR grades 0-4" in msg


def test_class_folders_named_by_dr_grade_words_become_grades(tmp_path, caplog):
    """The Kaggle "Gaussian filtered" layout: five words would sort alphabetically into five
    unordered classes; read as the grades 0-4 they are."""
    names = ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]
    data = _folders(tmp_path / "gaussian", dict.fromkeys(names, 2))
    with caplog.at_level(logging.WARNING):
        s = load_imageset(data)
    assert s.class_names == ["0", "1", "2", "3", "4"]
    for key, label in zip(s.keys, s.labels, strict=True):
        assert dr_grade_of(key.split("/")[0]) == int(s.class_names[label])


def test_words_of_other_tasks_stay_class_names(tmp_path):
    s = load_imageset(_folders(tmp_path / "d", {"healthy": 2, "mild": 2, "severe": 2}))
    assert s.class_names == ["healthy", "mild", "severe"]  # not DR: nothing DR-specific
    s = load_imageset(_folders(tmp_path / "e", {"mild": 2, "moderate": 2, "severe": 2}))
    assert s.class_names == ["mild", "moderate", "severe"]


def test_grade_word_in_a_validation_set_of_a_numeric_model(tmp_path):
    val = _csv_set(tmp_path, ["0", "Moderate", "4"])
    s = load_imageset(val, classes=["0", "1", "2", "3", "4"])
    assert s.labels.tolist() == [0, 2, 4]


def test_a_site_with_grade_words_joins_a_site_with_numbers(tmp_path):
    a = _folders(tmp_path / "A", {"0": 2, "2": 2})
    b = _folders(tmp_path / "B", {"No DR": 2, "Moderate": 2}, seed=1)
    s = load_sites([a, b])
    assert s.class_names == ["0", "2"]
    assert sorted(np.bincount(s.labels).tolist()) == [4, 4]


# --------------------------------------------------------------- 3. class names across splits


def test_validation_class_name_differing_from_training_is_refused(tmp_path):
    root = tmp_path / "kaggle"
    _folders(root / "train", {"Grade 0": 3, "Grade 2": 3})
    _folders(root / "valid", {"grade_0": 2, "grade_2": 2}, seed=1)
    _folders(root / "test", {"grade_0": 2, "grade_2": 2}, seed=2)
    msg = _one_line_error(root)
    assert str(root / "test" / "grade_0") in msg or str(root / "valid" / "grade_0") in msg
    assert "nearest: 'Grade 0'" in msg


def test_split_layout_with_a_class_missing_from_validation_is_accepted(tmp_path):
    root = tmp_path / "kaggle"
    _folders(root / "train", {"0": 3, "1": 3, "2": 3})
    _folders(root / "valid", {"0": 2, "1": 2}, seed=1)
    s = load_imageset(root)
    assert s.class_names == ["0", "1", "2"]


def test_val_data_folder_names_point_at_the_training_class(tmp_path):
    val = _folders(tmp_path / "val", {"grade_0": 2, "grade_2": 2})
    msg = _one_line_error(val, classes=["Grade 0", "Grade 2"])
    assert "'grade_0'" in msg and "nearest: 'Grade 0'" in msg


def test_two_sites_naming_one_class_differently_are_refused(tmp_path):
    a = _folders(tmp_path / "clinicA", {"Grade 0": 2, "Grade 2": 2})
    b = _folders(tmp_path / "clinicB", {"grade_0": 2, "grade_2": 2}, seed=1)
    with pytest.raises(MedtuneError) as info:
        load_sites([a, b])
    msg = str(info.value)
    assert "'grade_0'" in msg and "'Grade 0'" in msg and "clinicB" in msg


# --------------------------------------------------------------- 4. empty class folder in val


def test_empty_class_folder_in_a_validation_set_is_an_absent_class(tmp_path, caplog):
    val = _folders(tmp_path / "val", {"0": 2, "1": 2, "2": 0})
    (val / "2" / "notes.txt").write_text("exported without images")
    with caplog.at_level(logging.WARNING):
        s = load_imageset(val, classes=["0", "1", "2"])
    assert s.class_names == ["0", "1", "2"] and np.bincount(s.labels).tolist() == [2, 2]
    assert str(val / "2") in caplog.text and "absent" in caplog.text


def test_empty_class_folder_in_training_data_is_still_refused(tmp_path):
    train = _folders(tmp_path / "train", {"0": 2, "1": 2, "2": 0})
    msg = _one_line_error(train)
    assert str(train / "2") in msg and "class folder has no usable image" in msg


# --------------------------------------------------------------- 5. small sites and fractions


def _two_sites(tmp_path: Path, small_per_class: int = 2) -> object:
    big = _folders(tmp_path / "clinicA", dict.fromkeys(["0", "1", "2"], 8))
    small = _folders(tmp_path / "clinicB", dict.fromkeys(["0", "1", "2"], small_per_class), 1)
    return load_sites([big, small])


@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.1, 0.1), (0.05, 0.05), (0.2, 0.0)])
def test_a_six_image_site_gives_every_class_to_validation(tmp_path, val, test):
    s = _two_sites(tmp_path)
    splits = make_splits(s, val=val, test=test, seed=0)
    sites = np.asarray(s.sites)
    for site in ("clinicA", "clinicB"):
        mine = sites == site
        for name in ("train", "val"):  # every class with 2 images: one trains, one validates
            assert set(s.labels[mine & (splits == name)].tolist()) == {0, 1, 2}, (site, name)
    if test:
        assert set(s.labels[(sites == "clinicA") & (splits == "test")].tolist()) == {0, 1, 2}


def test_the_small_site_gets_a_test_share_once_it_has_three_per_class(tmp_path):
    s = _two_sites(tmp_path, small_per_class=3)
    splits = make_splits(s, val=0.15, test=0.15, seed=0)
    small = np.asarray(s.sites) == "clinicB"
    for name in ("train", "val", "test"):
        assert set(s.labels[small & (splits == name)].tolist()) == {0, 1, 2}, name


def test_a_rare_class_of_a_large_set_reaches_validation():
    labels = np.r_[np.zeros(200, int), np.ones(2, int)]
    data = SimpleNamespace(labels=labels, groups=None, predefined_split=None)
    splits = make_splits(data, val=0.15, test=0.15, seed=0)
    assert sorted(splits[labels == 1].tolist()) == ["train", "val"]


def test_refusal_advice_works_when_followed():
    """No class can spare an image: the message says what to add, and adding it works."""
    data = SimpleNamespace(
        labels=np.array([0, 1, 2]), groups=None, predefined_split=None, class_names=list("abc")
    )
    with pytest.raises(MedtuneError) as info:
        make_splits(data, val=0.15, test=0.15)
    msg = str(info.value)
    assert "'a': 1" in msg and "add a second image" in msg
    assert "fraction" not in msg and "n_splits" not in msg  # no advice that cannot work
    data.labels = np.array([0, 1, 2, 0])  # followed: a second image of class 'a'
    splits = make_splits(data, val=0.15, test=0.15)
    assert sorted(splits[data.labels == 0].tolist()) == ["train", "val"]


def test_group_aware_small_split_keeps_patients_together():
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    data = SimpleNamespace(labels=labels, groups=groups, predefined_split=None)
    splits = make_splits(data, val=0.1, test=0.1, seed=2)
    for g in set(groups):
        assert len({splits[i] for i in range(8) if groups[i] == g}) == 1
    assert set(labels[splits == "val"].tolist()) == {0, 1}
    assert set(labels[splits == "train"].tolist()) == {0, 1}
