"""Issue 20 item 4: a setting given explicitly wins over a preset and a loaded config, whatever its
value, and ``medtune.train`` and ``medtune train`` resolve the same settings the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SETTINGS, cli_flags

import medtune
from medtune.cli.main import main
from medtune.cli.settings import fundus_options
from medtune.config import PRESETS, TrainConfig
from medtune.io import write_yaml
from medtune.workflows.train import build_config

#: A one-step fine-tuning run: config.yaml is what is compared, the training just has to finish.
#: ``fundus`` as ``--fundus none`` gives it, so both calls are given the same settings.
QUICK = {**TINY_SETTINGS, "epochs": 1, "max_steps_per_epoch": 1, "fundus": fundus_options("none")}
#: A linear probe on unrotated features: the quickest run that writes a config.yaml.
PROBE = {**QUICK, "strategy": "linear-probe", "probe_rotations": False}


def _python_then_cli(data: Path, out: Path, cli_args: list[str], **keywords) -> tuple[str, str]:
    """``config.yaml`` written by ``medtune.train(**keywords)``, then by ``medtune train
    CLI_ARGS``, into the same run folder (config.yaml holds the folder's absolute path)."""
    medtune.train(str(data), out=str(out), **keywords)
    from_python = (out / "config.yaml").read_text(encoding="utf-8")
    shutil.rmtree(out)
    assert main(["train", "--data", str(data), "--out", str(out), *cli_args]) == 0
    return from_python, (out / "config.yaml").read_text(encoding="utf-8")


def test_an_explicit_keyword_beats_the_preset_in_python_and_on_the_command_line(
    graded_folder: Path, tmp_path: Path
) -> None:
    """The seed preset sets sgd; optimizer="adamw" (the default) must still train with AdamW."""
    assert PRESETS["seed"]["optimizer"] == "sgd" and TrainConfig().optimizer == "adamw"
    from_python, from_cli = _python_then_cli(
        graded_folder,
        tmp_path / "run",
        ["--preset", "seed", "--optimizer", "adamw", *cli_flags(**QUICK)],
        preset="seed",
        optimizer="adamw",
        **QUICK,
    )
    config = yaml.safe_load(from_python)
    assert config["optimizer"] == "adamw" and config["preset"] == "seed"
    assert config["lr"] == PRESETS["seed"]["lr"] and config["freeze"] == 2  # the rest: preset
    assert from_python == from_cli


def test_an_explicit_default_beats_a_loaded_config_in_python_and_on_the_command_line(
    graded_folder: Path, tmp_path: Path
) -> None:
    """A config file says sgd and lr 0.05; optimizer="adamw" and lr=0.002 (both the defaults)
    given explicitly must win, and the file's other values must stay."""
    path = tmp_path / "config.yaml"
    write_yaml(path, {**PROBE, "optimizer": "sgd", "lr": 0.05, "freeze": 1})
    explicit = {"optimizer": "adamw", "lr": TrainConfig().lr}
    from_python, from_cli = _python_then_cli(
        graded_folder,
        tmp_path / "run",
        ["--config", str(path), "--optimizer", "adamw", "--lr", str(TrainConfig().lr)],
        config=TrainConfig.load(path),
        **explicit,
    )
    config = yaml.safe_load(from_python)
    assert config["optimizer"] == "adamw" and config["lr"] == TrainConfig().lr
    assert config["freeze"] == 1 and config["strategy"] == "linear-probe"  # from the file
    assert from_python == from_cli


def test_a_config_file_keeps_its_own_values_over_the_preset_it_names(tmp_path: Path) -> None:
    """A run trained with --preset seed --lr 0.05 reruns with lr 0.05 (the preset lies beneath
    the file), and a short hand-written file naming the preset gets the preset's values."""
    resolved = tmp_path / "resolved.yaml"
    write_yaml(resolved, {**TrainConfig(data="x", preset="seed", lr=0.05).to_dict()})
    assert build_config(TrainConfig.load(resolved)).lr == 0.05  # not the preset's 0.01
    short = tmp_path / "short.yaml"
    write_yaml(short, {"data": "x", "preset": "seed", "freeze": 3})
    loaded = TrainConfig.load(short)
    assert loaded.freeze == 3 and loaded.optimizer == "sgd" and loaded.backbone == "googlenet"


def test_an_unknown_preset_in_a_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    from medtune.errors import MedtuneError

    path = tmp_path / "config.yaml"
    write_yaml(path, {"data": "x", "preset": "sed"})
    with pytest.raises(MedtuneError, match=r"config.yaml: preset 'sed' is unknown; use one of"):
        TrainConfig.load(path)
