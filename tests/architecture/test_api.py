"""The public Python API: importable from ``medtune``, explicit, documented, and as the README
shows it."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import medtune
from medtune.config import FinetuneRecipe, TrainConfig, Unset

ROOT = Path(__file__).resolve().parents[2]
API = ("train", "resume", "evaluate", "predict", "export", "advise")


def test_every_workflow_is_importable_from_medtune_with_a_numpydoc_docstring():
    for name in API:
        func = getattr(medtune, name)
        doc = inspect.getdoc(func) or ""
        assert "Parameters\n----------" in doc and "Returns\n-------" in doc, name
        assert "Raises\n------" in doc, name


def test_train_takes_every_setting_as_an_explicit_keyword_with_its_default():
    """Every setting is a keyword whose default is an Unset carrying TrainConfig's default (so a
    keyword passed with the default's value still counts as given), documented from its field."""
    params = inspect.signature(medtune.train).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), "no **overrides"
    doc = inspect.getdoc(medtune.train)
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        assert field.name in params, field.name
        assert re.search(rf"^{field.name} : ", doc, re.M), f"{field.name} is not documented"
        if field.name in ("data", "preset"):  # positional data; preset is applied, not stored
            continue
        default = params[field.name].default
        assert isinstance(default, Unset), field.name
        assert default.default == getattr(defaults, field.name), field.name
        assert repr(default) == repr(getattr(defaults, field.name))  # help() shows the value
    for name in ("lr", "optimizer", "augment"):  # the generated entries carry the field's help
        help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata
        first_words = " ".join(help_text["help"].replace("`", "``").split()[1:4])
        assert first_words in " ".join(doc.split()), name


def test_the_recipe_defaults_are_written_once():
    recipe, config = FinetuneRecipe(), TrainConfig()
    for field in dataclasses.fields(FinetuneRecipe):
        assert getattr(config, field.name) == getattr(recipe, field.name), field.name
    assert config.recipe == recipe


def test_help_shows_every_parameter():
    out = subprocess.run(
        [sys.executable, "-c", "import medtune; help(medtune.train)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PAGER": "cat", "TERM": "dumb"},
        check=True,
    ).stdout
    for field in dataclasses.fields(TrainConfig):
        assert f"{field.name}:" in out or f"{field.name}=" in out, field.name


def test_onnx_predictor_imports_no_torch_sklearn_pandas_or_matplotlib():
    code = (
        "import sys, medtune, medtune.deploy.onnx_predictor\n"
        "heavy = [m for m in ('torch', 'sklearn', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    run, rows, result = namespace["run"], namespace["rows"], namespace["result"]
    assert (run.dir / "model.safetensors").is_file()
    assert 0.0 <= run.metrics["test"]["accuracy"] <= 1.0
    assert (result.dir / "report.html").is_file()
    assert len(rows) == 40 and {r["grade"] for r in rows} <= {0, 1, 2, 3, 4}
