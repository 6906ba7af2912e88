"""Inference engines compared on one run, in one process: speed and agreement with fp32 PyTorch.

    python benchmarks/engines.py --run RUN [--n N] [--repeats R] [--compile] [--json OUT]
                                 [--no-doc]

The run's validation images (its own ``splits.csv``, prepared as training did; the first ``--n``)
are scored by each engine; reported per engine: images/s of the model alone on prepared images
(batches of 32, the best of ``--repeats`` passes after one warm-up batch), the time to build it
(export, quantisation, compilation), and its answer against the fp32 PyTorch reference: the
largest difference in a calibrated probability, the share of images whose grade or referral
decision (at the run's validated sens90 threshold) changes, and the validation QWK and
referable AUC it would give.

Engines: PyTorch eager fp32 and bf16 autocast, ``torch.compile`` (with ``--compile``: minutes of
compilation on 2 cores), ONNX Runtime fp32 (medtune's engine, :mod:`medtune.deploy.engine`) and
post-training static INT8 (ONNX Runtime's quantiser, QDQ, per-channel weights, activations
calibrated on 64 TRAINING images so validation stays unseen), OpenVINO fp32 / bf16 / INT8 (the
``openvino`` package, ``pip install openvino``; skipped when absent). Prints JSON to stdout and
rewrites the engine table of ``docs/performance.md`` (unless ``--no-doc``), naming the CPU. Time
it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import REPO, machine, rewrite_block, say

BATCH = 32
BEGIN, END = "<!-- engines:begin -->", "<!-- engines:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a finished medtune run (DR grades)")
    p.add_argument("--n", type=int, default=512, help="validation images scored (default 512)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per engine (best kept)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/performance.md")
    return p.parse_args(argv)


def batched(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` on normalised (N, 3, S, S) float32 applied 32 images at a time."""
    return lambda x: np.concatenate([fn(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def torch_engines(model: Any, compile_too: bool) -> dict[str, Callable[[], Callable]]:
    import torch

    def eager(bf16: bool) -> Callable:
        net = model.eval().to(memory_format=torch.channels_last)

        def run(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return net(t).float().numpy()

        return batched(run)

    def compiled() -> Callable:
        net = torch.compile(model.eval())

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(x)).float().numpy()

        return batched(run)  # compiled by the warm-up batch (counted as build time)

    engines = {
        "pytorch-eager-fp32": lambda: eager(False),
        "pytorch-eager-bf16": lambda: eager(True),
    }
    if compile_too:
        engines["pytorch-compile-fp32"] = compiled
    return engines


def onnx_engines(graph: Path, calibration: np.ndarray) -> dict[str, Callable[[], Callable]]:
    import onnxruntime as ort

    def session(path: Path) -> Callable:
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return batched(lambda x: sess.run(["logits"], {name: x})[0])

    engines = {
        "onnxruntime-fp32": lambda: session(graph),
        "onnxruntime-int8": lambda: session(quantised(graph, calibration)),
    }
    if importlib.util.find_spec("openvino") is not None:
        for hint in ("f32", "bf16"):
            engines[f"openvino-{hint.replace('f32', 'fp32')}"] = lambda h=hint: openvino(graph, h)
        engines["openvino-int8"] = lambda: openvino(quantised(graph, calibration), "f32")
    return engines


def quantised(graph: Path, calibration: np.ndarray) -> Path:
    """Post-training static INT8 (ONNX Runtime's quantiser: QDQ, per-channel weights)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = graph.with_name("int8.onnx")
    if out.is_file():
        return out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + 16] for i in range(0, len(calibration), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    pre = graph.with_name("pre.onnx")
    quant_pre_process(str(graph), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def openvino(graph: Path, hint: str) -> Callable:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(graph)), "CPU", {"INFERENCE_PRECISION_HINT": hint}
    )
    return batched(lambda x: compiled(x)[compiled.output(0)])


def answer(card: Any, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Probabilities, grades, referral decisions and validation figures of one engine."""
    from sklearn.metrics import roc_auc_score

    from medtune.evaluation.scores import qwk

    probs = card.probabilities(logits)
    grades = card.decode(probs)
    task = card.label_space.binary_task
    point = card.operating_points.at("none", "sens90") if card.operating_points else None
    score = task.score(probs) if task is not None else None
    refer = None if point is None else score >= point.threshold
    auc = None if task is None else float(roc_auc_score(task.labels(labels), score))
    return {
        "probs": probs,
        "grades": grades,
        "refer": refer,
        "val_qwk": qwk(labels, grades, card.num_classes),
        "val_referable_auc": auc,
    }


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    out = {
        "max_abs_prob_diff": float(np.abs(ref["probs"] - got["probs"]).max()),
        "grade_changes": float(np.mean(ref["grades"] != got["grades"])),
        "val_qwk": round(got["val_qwk"], 4),
        "val_referable_auc": None
        if got["val_referable_auc"] is None
        else round(got["val_referable_auc"], 4),
    }
    if ref["refer"] is not None:
        out["referral_changes"] = float(np.mean(ref["refer"] != got["refer"]))
    return out


def time_engine(build: Callable[[], Callable], x: np.ndarray, repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    run = build()
    run(x[:BATCH])  # warm-up (first-call allocation, lazy initialisation)
    built = time.perf_counter() - started
    best, logits = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        logits = run(x)
        best = min(best, time.perf_counter() - t)
    return {"images_per_s": round(len(x) / best, 1), "build_s": round(built, 1), "logits": logits}


def load(run: Path, n: int) -> tuple[Any, Any, np.ndarray, np.ndarray, np.ndarray]:
    from medtune.data.normalise import normalise_images
    from medtune.runs import RunFolder, prepare_run_data

    folder = RunFolder(run)
    model, card = folder.load_model()
    data = prepare_run_data(folder.read_config(), folder.dir)
    images = np.asarray(data.val.images[0 : min(n, len(data.val))])
    labels = np.asarray(data.val.labels[: len(images)])
    spec = card.input_spec
    calibration = normalise_images(
        np.asarray(data.train.images[0 : min(64, len(data.train))]), spec.mean, spec.std
    )
    return model, card, normalise_images(images, spec.mean, spec.std), labels, calibration


def table(result: dict[str, Any]) -> str:
    rows = [
        "| engine | images/s (model only) | build s | max abs prob diff vs fp32 PyTorch | grade "
        "changes | referral changes | val QWK | val referable AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["engines"].items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        rows.append(
            f"| {name} | {r['images_per_s']} | {r['build_s']} | {r['max_abs_prob_diff']:.2g} | "
            f"{r['grade_changes']:.1%} | {r.get('referral_changes', 0):.1%} | {r['val_qwk']} | "
            f"{r['val_referable_auc']} |"
        )
    return (
        f"{BEGIN}\n_Generated by `python benchmarks/engines.py --run RUN` on {result['machine']}; "
        f"{result['n_images']} validation images of `{result['run']}` at {result['image_size']} "
        f"px, batches of {BATCH}._\n\n" + "\n".join(rows) + f"\n{END}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, card, x, labels, calibration = load(Path(args.run), args.n)
    result: dict[str, Any] = {
        "machine": machine(),
        "run": Path(args.run).name,
        "n_images": len(x),
        "image_size": card.input_spec.image_size,
        "engines": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        from medtune.deploy.engine import engine_graph

        graph = Path(tmp) / "model.onnx"
        graph.write_bytes(engine_graph(model, card))
        engines = {**torch_engines(model, args.compile), **onnx_engines(graph, calibration)}
        ref = None
        for name, build in engines.items():
            say(f"{name} ...")
            try:
                timed = time_engine(build, x, args.repeats)
            except Exception as exc:  # an engine that fails is reported, not fatal
                result["engines"][name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            got = answer(card, timed.pop("logits"), labels)
            ref = ref or got
            result["engines"][name] = {**timed, **compare(ref, got)}
            say(f"{name}: {result['engines'][name]}")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if not args.no_doc:
        doc = REPO / "docs" / "performance.md"
        rewrite_block(doc, BEGIN, END, table(result), "# Performance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
