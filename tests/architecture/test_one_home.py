"""One home per concept, checked on the source: one reader/writer of model descriptions, the input
spec as the only carrier of ``mean``/``std``, one scorer protocol for "logits, features, TTA,
site-shift score", and no loose label plumbing where the label space belongs."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "medtune"
CARD = "evaluation/card.py"


def trees() -> dict[str, ast.Module]:
    return {
        str(p.relative_to(SRC)): ast.parse(p.read_text(encoding="utf-8"))
        for p in sorted(SRC.rglob("*.py"))
    }


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            yield node, [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


def test_one_reader_and_writer_of_model_descriptions():
    """Only ``evaluation/card.py`` names the card file, parses a card or defines its reader and
    writer; the run folder and the ONNX predictor go through it."""
    offenders = []
    for name, tree in trees().items():
        if name == CARD:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("model.json", "sidecar.json"):
                offenders.append(f"{name}:{node.lineno} names the card file")
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "from_dict"
                and isinstance(node.value, ast.Name)
                and node.value.id in ("ModelCard", "ModelMeta")
            ):
                offenders.append(f"{name}:{node.lineno} parses a card itself")
        for fn, _ in functions(tree):
            readers = ("read_card", "write_card", "validate_sidecar", "build_sidecar")
            # RunFolder.read_card/write_card delegate to the card module's
            if fn.name in readers and name != "runs/folder.py":
                offenders.append(f"{name}:{fn.lineno} defines {fn.name}")
    assert not offenders, offenders
    folder = (SRC / "runs" / "folder.py").read_text(encoding="utf-8")
    onnx = (SRC / "deploy" / "onnx_predictor.py").read_text(encoding="utf-8")
    assert "from medtune.evaluation.card import" in folder
    assert "from medtune.evaluation.card import" in onnx
    assert "json.loads" not in folder.split("def read_card")[1].split("def write_card")[0]


#: Functions allowed to take ``mean``/``std``: the normalisation formula itself (its one home,
#: fed from an InputSpec by every caller) and ``medtune.train``'s keywords (TrainConfig settings).
MEAN_STD_ALLOWED = {
    ("data/normalise.py", "normalise_batch"),
    ("data/normalise.py", "normalise_images"),
    ("data/normalise.py", "normalisation_table"),
    ("workflows/train.py", "train"),
}


def test_no_loose_mean_std_parameters_outside_the_input_spec():
    found = {
        (name, fn.name)
        for name, tree in trees().items()
        for fn, args in functions(tree)
        if {"mean", "std"} & set(args)
    }
    assert found <= MEAN_STD_ALLOWED, sorted(found - MEAN_STD_ALLOWED)


def test_label_semantics_live_in_the_label_space():
    """``ordinal`` / ``positive_class`` beside ``class_names`` in one signature is the label
    space spelled out; no function takes them loose any more (metrics, referral, report rows,
    predict), and the positive-class default is written once."""
    loose = sorted(
        f"{name}:{fn.name}"
        for name, tree in trees().items()
        for fn, args in functions(tree)
        if "class_names" in args and ({"ordinal", "positive_class"} & set(args))
        and name != "evaluation/labels.py"
    )  # fmt: skip
    assert not loose, loose
    defaults = [
        name
        for name, tree in trees().items()
        for fn, _ in functions(tree)
        if fn.name == "default_positive_class"
    ]
    assert defaults == ["evaluation/labels.py"]


def test_one_scorer_protocol():
    """ "Logits and features, then TTA, then the site-shift score" is written once
    (``evaluation/scoring.score``): no workflow or predictor scores site shift itself."""
    offenders = []
    for name, tree in trees().items():
        if name in ("evaluation/scoring.py", "engines/finalize.py"):  # finalize FITS the model
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in (
                "site_shift_scores",
                "_logits_and_site_shift_scores",
            ):
                offenders.append(f"{name}: {node.name}")
            call = node.func if isinstance(node, ast.Call) else None
            implementations = ("evaluation/inference.py", "deploy/exporter.py")
            if (
                isinstance(call, ast.Attribute)
                and call.attr == "logits_and_features"
                and name not in implementations
            ):
                offenders.append(f"{name}:{node.lineno} calls logits_and_features")
    assert not offenders, offenders


def test_dead_code_is_gone():
    names = {
        (name, fn.name) for name, tree in trees().items() for fn, _ in functions(tree)
    }  # fmt: skip
    assert ("evaluation/inference.py", "softmax") not in names
    assert ("evaluation/plots.py", "gradcam_grid_png") not in names
    create = next(
        args
        for name, tree in trees().items()
        for fn, args in functions(tree)
        if name == "models/backbones.py" and fn.name == "create_backbone"
    )
    assert not {"num_classes", "image_size", "mean", "std"} & set(create)
    predict = (SRC / "workflows" / "predict.py").read_text(encoding="utf-8")
    assert "torch_meta" not in predict and "def infer(" not in predict
