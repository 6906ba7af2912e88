"""Hot-path micro-benchmark: decoding, the quality gate and site augmentation, before vs after.

    python benchmarks/hotpath.py [--shared PATH] [--baseline-ref REF] [--n N] [--rounds R]
                                 [--run RUN] [--no-agreement] [--json OUT]

One invocation times the same stages for two versions of medtune on the same images: the
baseline (``--baseline-ref``, by default the last commit before the fast paths, extracted with
``git archive`` into a temporary folder) and the working tree. Each version runs in its own
process (``--worker``, with ``PYTHONPATH`` pointing at its ``src``), one core (OpenCV, PyTorch and
BLAS limited to one thread); the processes alternate for ``--rounds`` rounds and each stage's
median is reported, so a shared machine's load affects both alike. Times are the CPU time of the
process (``time.process_time``), which moves less with other load than wall time. Report the
ratios; absolute milliseconds only from an otherwise idle machine.

Stages, CPU milliseconds per image:

* ``prepare_png224``: ``prepare_image`` of an APTOS 224 px PNG (decode, FOV crop, resize);
* ``prepare_jpeg1024``: the same for EyePACS JPEGs (about 1024 x 683);
* ``prepare_jpeg3008``: the same for synthetic camera-size JPEGs (3008 x 2000, made here);
* ``quality_gate``: ``assess_quality`` on the input ``predict`` gives it (baseline: the photo
  decoded at long side 448; now: the 224 px network input), on the EyePACS JPEGs;
* ``predict_front_end``: what ``predict`` does per file before the model: decode, gate, prepare;
* ``fov_mask``: ``field_of_view_mask`` of a 224 px network input;
* ``site_augment``: one epoch's ``augment_site`` with every site augmentation (baseline: the FOV
  detected on every call; now: the cached mask passed in).

It also reports how far the new network inputs are from the baseline's (mean / max absolute
pixel difference on the EyePACS JPEGs), with ``--run RUN`` how much that moves the run's
probabilities, and (unless ``--no-agreement``) the quality verdicts of both versions on 733
APTOS, every EyePACS and every IDRiD photograph in ``--shared``. Prints JSON to stdout and
progress to stderr; exits 2 when the shared data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import REPO, say

#: The last commit of main before the hot-path work (gate on the decoded photograph at 448 px,
#: decoding at twice the image size, FOV detected every epoch).
BASELINE_REF = "b39e105"
SIZE = 224
SETS = {"aptos2019-224": 733, "eyepacs-dev": 0, "idrid-800": 0}  # images for the agreement (0: all)
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="data folder")
    p.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline")
    p.add_argument("--n", type=int, default=60, help="images per timed stage")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per version")
    p.add_argument("--run", default="", help="a run folder: report the probability change")
    p.add_argument("--no-agreement", action="store_true", help="skip the verdict agreement")
    p.add_argument("--json", default="", help="also write the JSON result here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: a spec file
    return p.parse_args(argv)


# --------------------------------------------------------------------------- worker side


def _api() -> dict[str, Any]:
    """The functions of whichever medtune is on the path, called the way ``predict`` calls them."""
    import medtune
    from medtune.data import preprocess
    from medtune.data.fundus import field_of_view_mask
    from medtune.data.site_augment import SITE_AUGMENTATIONS, augment_site
    from medtune.evaluation import quality

    new = hasattr(quality, "working_array")  # the gate takes the working-size network input

    def decode(path: str) -> Any:
        if new:
            return preprocess.decode_source(path, min_side=SIZE)
        return preprocess.decode_source(path, 2 * SIZE)

    def front_end(path: str) -> tuple[np.ndarray, str]:
        img = decode(path)
        if new:
            arr = preprocess.prepare_image(img, SIZE)
            return arr, quality.assess_quality(arr).code
        code = quality.assess_quality(img).code
        return preprocess.prepare_image(img, SIZE), code

    def augment(t: Any, rng: np.random.Generator, fov: np.ndarray) -> Any:
        if new:
            return augment_site(t, SITE_AUGMENTATIONS, rng, fov=fov)
        return augment_site(t, SITE_AUGMENTATIONS, rng)

    return {
        "new": new,
        "file": medtune.__file__,
        "decode": decode,
        "front_end": front_end,
        "prepare": lambda src: preprocess.prepare_image(src, SIZE),
        "gate": lambda x: quality.assess_quality(x).code,
        "fov": field_of_view_mask,
        "augment": augment,
    }


def _per_image_ms(fn: Any, items: list[Any]) -> float:
    """CPU milliseconds per item of this (one-thread) process: on a shared machine the CPU time a
    stage uses moves far less with the load than its wall time."""
    fn(items[0])  # warm-up (imports, caches)
    start = time.process_time()
    for item in items:
        fn(item)
    return 1e3 * (time.process_time() - start) / len(items)


def _timings(api: dict[str, Any], files: dict[str, list[str]]) -> dict[str, float]:
    import torch

    jpegs = files["eyepacs"]
    gate_inputs = [api["decode"](f) for f in jpegs]
    prepared = [api["prepare"](img) for img in gate_inputs]
    if api["new"]:
        gate_inputs = prepared
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in prepared]
    masks = [api["fov"](a) for a in prepared]  # the cache stores these once per image
    rng = np.random.default_rng(0)
    return {
        "prepare_png224": _per_image_ms(api["prepare"], files["aptos"]),
        "prepare_jpeg1024": _per_image_ms(api["prepare"], jpegs),
        "prepare_jpeg3008": _per_image_ms(api["prepare"], files["camera"]),
        "quality_gate": _per_image_ms(api["gate"], gate_inputs),
        "predict_front_end": _per_image_ms(api["front_end"], jpegs),
        "fov_mask": _per_image_ms(api["fov"], prepared),
        "site_augment": _per_image_ms(
            lambda i: api["augment"](tensors[i], rng, masks[i]), list(range(len(tensors)))
        ),
    }


def worker(spec_path: str) -> None:
    """Run inside one version's process: timings, prepared inputs, verdicts (JSON to stdout)."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    api = _api()
    out: dict[str, Any] = {"medtune": api["file"], "new": api["new"]}
    out["ms"] = _timings(api, spec["files"])
    if spec.get("inputs_out"):
        np.save(spec["inputs_out"], np.stack([api["prepare"](f) for f in spec["files"]["eyepacs"]]))
    if spec.get("agreement"):
        out["codes"] = {f: api["front_end"](f)[1] for f in spec["agreement"]}
    print(json.dumps(out))


# --------------------------------------------------------------------------- parent side


def baseline_src(ref: str, into: Path) -> Path:
    """``src/`` of ``ref`` extracted into ``into`` (``git archive``; nothing else is touched)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def camera_jpegs(folder: Path, n: int) -> list[str]:
    """``n`` synthetic fundus photographs at 3008 x 2000 px (JPEG q92), as a camera writes."""
    from PIL import Image

    from medtune.data.synthetic import synthesize_image

    out = []
    for i in range(n):
        disc = Image.fromarray(synthesize_image(i % 5, 512, seed=i).image).resize((2000, 2000))
        frame = Image.new("RGB", (3008, 2000))
        frame.paste(disc, (504, 0))
        path = folder / f"camera-{i}.jpg"
        frame.save(path, quality=92)
        out.append(str(path))
    return out


def listed(folder: Path, limit: int) -> list[str]:
    import csv

    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        names = [row["image"] for row in csv.DictReader(fh)]
    return [str(folder / "images" / n) for n in names[: limit or None]]


def run_worker(src: Path, spec: dict[str, Any], tmp: Path, label: str) -> dict[str, Any]:
    spec_path = tmp / f"spec-{label}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{label} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["medtune"].startswith(str(src)):
        raise SystemExit(f"{label} worker imported {result['medtune']}, not {src}")
    return result


def agreement(old: dict[str, str], new: dict[str, str]) -> dict[str, Any]:
    """Verdicts of both versions per set: counts, agreement and every disagreement."""
    out: dict[str, Any] = {}
    for set_name in SETS:
        keys = [k for k in old if f"/{set_name}/" in k]
        out[set_name] = {
            "n": len(keys),
            "same_code": sum(old[k] == new[k] for k in keys),
            "same_gradable": sum((old[k] == "ok") == (new[k] == "ok") for k in keys),
            "baseline": dict(Counter(old[k] for k in keys)),
            "current": dict(Counter(new[k] for k in keys)),
            "changed": {Path(k).name: [old[k], new[k]] for k in keys if old[k] != new[k]},
        }
    return out


def probability_change(run: str, old: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """How much the run's calibrated probabilities move between the two versions' inputs."""
    from medtune.workflows.predict import load_predictor

    predictor = load_predictor(run=run)
    p_old, _ = predictor.infer(old)
    p_new, _ = predictor.infer(new)
    diff = np.abs(np.asarray(p_old) - np.asarray(p_new))
    return {
        "n": int(len(old)),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "same_argmax": float(np.mean(p_old.argmax(1) == p_new.argmax(1))),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from run import machine

    shared = Path(args.shared)
    missing = [s for s in SETS if not (shared / s / "labels.csv").is_file()]
    if missing:
        print(f"benchmarks/hotpath.py needs {', '.join(missing)} under {shared}; pass --shared "
              "PATH", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory(prefix="medtune-hotpath-") as tmp_name:
        tmp = Path(tmp_name)
        srcs = {"baseline": baseline_src(args.baseline_ref, tmp), "current": REPO / "src"}
        files = {
            "aptos": listed(shared / "aptos2019-224", args.n),
            "eyepacs": listed(shared / "eyepacs-dev", args.n),
            "camera": camera_jpegs(tmp, max(4, args.n // 6)),
        }
        load = [os.getloadavg()[0]]
        ms: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        codes: dict[str, dict[str, str]] = {}
        for r in range(args.rounds):
            for label, src in srcs.items():
                say(f"round {r + 1}/{args.rounds}: {label}")
                spec: dict[str, Any] = {"files": files}
                if r == 0:
                    spec["inputs_out"] = str(tmp / f"inputs-{label}.npy")
                    if not args.no_agreement:
                        spec["agreement"] = [
                            f for s, n in SETS.items() for f in listed(shared / s, n)
                        ]
                result = run_worker(src, spec, tmp, label)
                ms[label].append(result["ms"])
                if "codes" in result:
                    codes[label] = result["codes"]
        load.append(os.getloadavg()[0])
        inputs = {k: np.load(tmp / f"inputs-{k}.npy").astype(np.int16) for k in srcs}
    stages = {}
    for stage in ms["baseline"][0]:
        before = statistics.median(m[stage] for m in ms["baseline"])
        after = statistics.median(m[stage] for m in ms["current"])
        stages[stage] = {"baseline_ms": before, "current_ms": after, "ratio": before / after}
    diff = np.abs(inputs["baseline"] - inputs["current"])
    result: dict[str, Any] = {
        "machine": machine(),
        "load_average_1min": load,
        "baseline_ref": args.baseline_ref,
        "images_per_stage": args.n,
        "rounds": args.rounds,
        "stages": stages,
        "network_input_change_eyepacs": {
            "n": int(len(diff)),
            "mean_abs_pixel_diff": float(diff.mean()),
            "max_abs_pixel_diff": int(diff.max()),
            "per_image_mean_max": float(diff.reshape(len(diff), -1).mean(axis=1).max()),
        },
        "command": "python benchmarks/hotpath.py " + " ".join(sys.argv[1:]),
    }
    if args.run:
        result["probability_change"] = probability_change(
            args.run, inputs["baseline"].astype(np.uint8), inputs["current"].astype(np.uint8)
        )
    if codes:
        result["quality_agreement"] = agreement(codes["baseline"], codes["current"])
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
