"""Issue 16 item 16: help and docs that match the code."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest

from medtune.cli import commands
from medtune.cli.main import build_parser, main
from medtune.config import TrainConfig
from medtune.transfer.advisor import SimilarityEvidence, decide

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "weights": None,
    "image_size": 40,
    "batch_size": 8,
    "fundus": {"crop": False},
    "val_fraction": 0.25,
    "test_fraction": 0.25,
    "precision": "32-true",
    "progress": False,
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help block of one option in the parser's --help, whitespace collapsed."""
    lines = parser.format_help().splitlines()
    flag = action.option_strings[-1]
    start = next(
        i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w+, )?{re.escape(flag)}\b", ln)
    )
    block = [lines[start]]
    for ln in lines[start + 1 :]:
        if re.match(r"\s{2}-", ln) or not ln.strip():
            break
        block.append(ln)
    return " ".join(" ".join(block).split())


def _shown(value: object) -> str:
    if isinstance(value, dict):  # --fundus {"crop": True, ...} -> "crop"
        return ",".join(k.replace("_", "-") for k, v in value.items() if v) or "none"
    return str(value)


def test_every_option_with_a_default_shows_it() -> None:
    settings = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            if isinstance(action, argparse._StoreConstAction):  # switches
                continue
            value = action.default
            if value is argparse.SUPPRESS and action.dest in settings:
                value = settings[action.dest]  # settings flags: TrainConfig's default
            if value is None or value is False or value in ("", argparse.SUPPRESS):
                continue  # "" is train's --data: required, no default
            if value is dataclasses.MISSING:  # fundus, augment: their default in words
                value = "default"
            text = _option_help(parser, action)
            assert "default" in text and _shown(value) in text, (name, action.dest, text)
            checked += 1
    assert checked >= 35  # train alone has ~30 such options
    weight_decay = next(a for a in _subparsers()["train"]._actions if a.dest == "weight_decay")
    assert "(default: 0.0001)" in _option_help(_subparsers()["train"], weight_decay)


def test_help_has_no_doubled_percent_signs(capsys) -> None:
    for argv in (["--help"], *([name, "--help"] for name in commands.COMMANDS)):
        with pytest.raises(SystemExit):
            main(list(argv))
        out = capsys.readouterr().out
        assert "%%" not in out, argv
        if argv[0] in ("--help", "evaluate"):
            assert "95% CIs" in out


def test_train_help_documents_environment_epochs_and_early_stopping() -> None:
    parser = _subparsers()["train"]
    text = " ".join(parser.format_help().split())
    assert "MLFLOW_TRACKING_URI" in text and "MEDTUNE_CACHE" in text
    epochs = next(a for a in parser._actions if a.dest == "epochs")
    assert "probes" in _option_help(parser, epochs) and "ignore" in _option_help(parser, epochs)
    early = _option_help(parser, next(a for a in parser._actions if a.dest == "early_stopping"))
    assert "0 turns it off" in early and "null" in early
    args = parser.parse_args(["--early-stopping", "0"])
    assert TrainConfig(**commands.train_overrides(args)).early_stopping is None
    doc = (ROOT / "docs" / "configuration.md").read_text()
    row = next(ln for ln in doc.splitlines() if ln.startswith("| `early_stopping`"))
    assert "`null` or `0`" in row
    assert "MLFLOW_TRACKING_URI" in doc


@pytest.mark.parametrize(("large", "similar"), [(True, True), (True, False)])
def test_readme_and_advisor_doc_give_the_advisors_finetune_flags(large, similar) -> None:
    n = 2000 if large else 50
    evidence = SimilarityEvidence(entropy=0.3 if similar else 0.9, reference_entropy=0.3)
    stages = [("a", None, 0.5), ("b", None, 0.5)]
    advice = decide({str(k): n for k in range(5)}, evidence, stages, 6)
    flags = f"--freeze {advice.freeze} --backbone-lr-mult {advice.backbone_lr_mult:g}"
    readme = (ROOT / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| large |"))
    assert f"{advice.scenario}. `finetune {flags}`" in row
    assert f"`finetune {flags}`" in (ROOT / "docs" / "advisor.md").read_text()


def test_probe_run_notes_ignored_epochs_and_has_the_documented_files(
    graded_folder: Path, tmp_path: Path, caplog
) -> None:
    from medtune.workflows.train import train

    with caplog.at_level(logging.WARNING, logger="medtune"):
        result = train(
            data=str(graded_folder), out=str(tmp_path / "probe"), strategy="linear-probe",
            epochs=3, **TINY,
        )  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "ignores epochs=3" in r.getMessage()]
    assert len(notes) == 1 and "linear-probe" in notes[0]
    files = {p.name for p in result.dir.iterdir()}
    assert {"config.yaml", "splits.csv", "model.safetensors", "model.json"} <= files
    assert {"metrics.json", "val_logits.npz", "probe.json"} <= files
    assert "checkpoints" not in files and "logs" not in files


def test_demo_writes_and_prints_a_report_per_run(graded_folder: Path, tmp_path: Path, capsys):
    from medtune.workflows.demo import run_demo

    runs = run_demo(out=tmp_path / "demo", data=str(graded_folder), epochs=1, **TINY)
    out = capsys.readouterr().out
    for name, run in runs.items():
        report = run.dir / "eval" / "test" / "report.html"
        assert report.is_file(), name
        assert f"{name} report: {report}" in out
        assert (run.dir / "eval" / "test" / "metrics.json").is_file()
    assert (runs["finetune"].dir / "checkpoints" / "best.ckpt").is_file()
    assert (runs["finetune"].dir / "logs" / "metrics.csv").is_file()
