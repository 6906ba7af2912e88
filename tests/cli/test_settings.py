"""Issue 20 item 4: the ``medtune train`` flags and the settings table of docs/configuration.md
are generated from TrainConfig's fields, and keep every flag medtune had."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from medtune.cli import settings
from medtune.cli.main import build_parser
from medtune.config import OPTIMIZERS, TrainConfig, field_default

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: Every settings flag of ``medtune train`` before the flags were generated, and its setting.
FLAGS_BEFORE = {
    "--data": "data", "--val-data": "val_data", "--test-data": "test_data", "--out": "out",
    "--val-fraction": "val_fraction", "--test-fraction": "test_fraction",
    "--backbone": "backbone", "--weights": "weights", "--image-size": "image_size",
    "--fundus": "fundus", "--strategy": "strategy", "--layer": "layer",
    "--no-probe-rotations": "probe_rotations", "--positive-class": "positive_class",
    "--epochs": "epochs", "--batch-size": "batch_size", "--lr": "lr", "--optimizer": "optimizer",
    "--backbone-lr-mult": "backbone_lr_mult", "--layer-decay": "layer_decay",
    "--freeze": "freeze", "--weight-decay": "weight_decay", "--l2sp": "l2sp",
    "--head-epochs": "head_epochs", "--warmup-epochs": "warmup_epochs",
    "--schedule": "schedule", "--lr-floor": "lr_floor", "--dropout": "dropout",
    "--class-weights": "class_weights", "--balanced-sampler": "balanced_sampler",
    "--hflip": "hflip", "--vflip": "vflip", "--no-rot90": "rot90", "--augment": "augment",
    "--ema": "ema", "--early-stopping": "early_stopping", "--seed": "seed",
    "--precision": "precision", "--workers": "num_workers", "--accelerator": "accelerator",
    "--devices": "devices", "--num-nodes": "num_nodes", "--dist-strategy": "dist_strategy",
    "--sync-batchnorm": "sync_batchnorm", "--max-steps-per-epoch": "max_steps_per_epoch",
    "--preset": "preset", "--skip-bad": "skip_bad", "--cache-dir": "cache_dir",
}  # fmt: skip


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _given(*argv: str) -> dict[str, object]:
    from medtune.cli.commands import train_overrides

    return train_overrides(_train_parser().parse_args(list(argv)))


def test_the_configuration_doc_table_is_the_generated_one(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert settings.with_settings_table(text) == text, "stale table: run make docs"
    assert settings.main([str(DOC), "--check"]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(text.replace("| `epochs` |", "| `epochz` |"), encoding="utf-8")
    assert settings.main([str(stale), "--check"]) == 1
    assert settings.main([str(stale)]) == 0 and stale.read_text(encoding="utf-8") == text
    for f in FIELDS.values():  # one row per setting, with its help
        assert f"| `{f.name}` |" in text and f.metadata["help"] in text, f.name


def test_every_flag_medtune_had_is_kept_for_the_same_setting() -> None:
    dests = {
        flag: action.dest for action in _train_parser()._actions for flag in action.option_strings
    }
    for flag, name in FLAGS_BEFORE.items():
        assert dests.get(flag) == name, flag
    on_command_line = {n for n in FIELDS if n not in settings.NOT_ON_COMMAND_LINE}
    assert on_command_line <= set(dests.values())  # and every other setting has one too


def test_flags_parse_to_the_settings_values_and_only_given_flags_count() -> None:
    assert _given() == {}  # nothing given: the config file, preset and defaults decide
    given = _given(
        "--data", "a", "--data", "b", "--workers", "3", "--no-rot90", "--weights", "none",
        "--fundus", "crop,mask", "--augment", "jpeg,blur", "--devices", "auto",
        "--optimizer", "adamw", "--lr", "0.002", "--early-stopping", "0",
    )  # fmt: skip
    assert given["data"] == ["a", "b"] and given["num_workers"] == 3
    assert given["rot90"] is False and given["weights"] is None and given["devices"] == "auto"
    assert given["fundus"]["crop"] and given["fundus"]["mask"] and not given["fundus"]["clahe"]
    assert given["augment"] == ["blur", "jpeg"]  # application order
    # a flag equal to the default is given all the same: it overrides a preset or a config
    assert given["optimizer"] == "adamw" and given["lr"] == TrainConfig().lr
    config = TrainConfig(**given)
    assert config.early_stopping is None and config.data == ["a", "b"]
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--optimizer", "adam"])


def test_each_setting_declares_help_and_its_choices_hold_its_default() -> None:
    for f in FIELDS.values():
        assert f.metadata.get("help"), f.name
        choices = f.metadata.get("choices")
        if choices:
            assert field_default(f) in (*choices, None), f.name
    assert FIELDS["optimizer"].metadata["choices"] == OPTIMIZERS
    optimizer = next(a for a in _train_parser()._actions if a.dest == "optimizer")
    assert tuple(optimizer.choices) == OPTIMIZERS


def test_validate_checks_every_declared_choice() -> None:
    from medtune.errors import MedtuneError

    for name in ("optimizer", "schedule", "strategy", "class_weights"):
        with pytest.raises(MedtuneError, match=rf"^{name} 'nope' is unknown; use one of"):
            TrainConfig(data="x", **{name: "nope"}).validate()
    TrainConfig(data="x", class_weights=None).validate()  # None: the default
    with pytest.raises(MedtuneError, match="fundus None is not a mapping"):
        TrainConfig(data="x", fundus=None).validate()
