"""Evidence for the image-quality gate's thresholds (``medtune.evaluation.quality``).

    python benchmarks/quality.py [--shared PATH] [--out docs/screening.md] [--sheet rejected.png]

1. Runs the gate on every image of the three real sets in ``../shared/data`` (APTOS 2019 at
   224 px, EyePACS at ~1024 px, IDRiD at 800 px; almost all gradable) and reports the share each
   rule rejects. Every photograph reaches the gate as ``predict`` gives it: the network input at
   :data:`IMAGE_SIZE` px made by ``prepare_image`` (its speed: ``benchmarks/hotpath.py``).
2. Runs it on made-up bad photographs derived from real-looking fundus photographs
   (``skimage.data.retina()`` at 512 and 1024 px, medtune's synthetic DR images) and on non-fundus
   frames; every one must be rejected with the expected code (exit status 1 otherwise).
3. Measures the sharpness of the retina photograph under increasing Gaussian blur (the blur rule's
   sensitivity).

Prints the JSON result to stdout, progress to stderr, and rewrites the block between
``<!-- quality:begin -->`` and ``<!-- quality:end -->`` in ``--out``. Exits 2 when the shared data
is absent. ``--sheet`` writes a contact sheet of the rejected real photographs for a visual check.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import REPO, rewrite_block, say
from PIL import Image, ImageDraw, ImageFilter

from medtune.data.images import load_rgb
from medtune.data.preprocess import prepare_image
from medtune.evaluation.quality import (
    QUALITY_CODES,
    QualityThresholds,
    assess_quality,
    quality_measures,
)

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
SETS = ("aptos2019-224", "eyepacs-dev", "idrid-800")
IMAGE_SIZE = 224  # the default backbone's input: the gate sees what the network sees
BLUR_SIGMA = 4.0  # Gaussian sigma of the "blur" defect, in pixels per 512 px of image side
BLUR_SWEEP = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
PCTS = (0.0, 0.5, 99.5, 100.0)
#: the measure each threshold is compared with
THRESHOLD_MEASURE = {
    "min_frame_level": "frame_level",
    "min_frame_spread": "frame_spread",
    "min_fov_fraction": "fov_fraction",
    "max_corner_ratio": "corner_ratio",
    "min_solidity": "fov_solidity",
    "min_brightness": "brightness",
    "max_brightness": "brightness",
    "max_clipped_share": "clipped_share",
    "min_saturation": "saturation",
    "min_red_blue": "red_blue",
    "min_red_green": "red_green",
    "min_sharpness": "sharpness",
    "min_coarse_sharpness": "coarse_sharpness",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="data folder")
    p.add_argument("--out", default=str(REPO / "docs" / "screening.md"))
    p.add_argument("--sheet", default="", help="PNG contact sheet of rejected real photographs")
    p.add_argument("--limit", type=int, default=0, help="first N images per set (0: all)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- real sets


def image_names(folder: Path) -> list[str]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        return [row["image"] for row in csv.DictReader(fh)]


def run_set(folder: Path, limit: int) -> dict[str, Any]:
    """The gate's verdict on every image of ``folder``; shares per code and speed."""
    names = image_names(folder)[: limit or None]
    codes: Counter[str] = Counter()
    rejected: list[tuple[str, str, dict[str, float]]] = []
    every: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        img = prepare_image(folder / "images" / name, IMAGE_SIZE)
        verdict = assess_quality(img)
        codes[verdict.code] += 1
        for key, value in quality_measures(img).items():  # all measures, untimed, for the margins
            every.setdefault(key, []).append(value)
        if not verdict.gradable:
            rejected.append((name, verdict.code, verdict.measures))
        if (i + 1) % 500 == 0:
            say(f"{folder.name}: {i + 1}/{len(names)}")
    n = len(names)
    return {
        "n": n,
        "counts": {code: codes.get(code, 0) for code in QUALITY_CODES},
        "shares": {code: codes.get(code, 0) / n for code in QUALITY_CODES},
        "rejected_share": 1.0 - codes.get("ok", 0) / n,
        "measure_percentiles": {
            key: dict(
                zip(("min", "p0.5", "p99.5", "max"), np.percentile(v, PCTS).tolist(), strict=True)
            )
            for key, v in every.items()
        },
        "rejected": [
            {"image": name, "code": code, "measures": {k: round(v, 4) for k, v in m.items()}}
            for name, code, m in rejected
        ],
    }


def contact_sheet(items: list[tuple[Path, str]], out: Path, cell: int = 160, cols: int = 8) -> None:
    rows = max(1, (len(items) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 14)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (path, caption) in enumerate(items):
        img = load_rgb(path, max_side=cell)
        x, y = (i % cols) * cell, (i // cols) * (cell + 14)
        sheet.paste(img, (x, y))
        draw.text((x + 2, y + cell), caption[:26], fill=(255, 255, 0))
    sheet.save(out)


# ------------------------------------------------------------------ made-up bad photographs


def fundus_sources() -> dict[str, Image.Image]:
    """Gradable, real-looking fundus photographs: the scikit-image retina and synthetic DR."""
    from skimage import data

    from medtune.data.synthetic import synthesize_image

    retina = Image.fromarray(data.retina())
    out = {f"retina-{s}": retina.resize((s, s), Image.Resampling.LANCZOS) for s in (512, 1024)}
    for grade in (0, 2, 4):
        out[f"synthetic-g{grade}"] = Image.fromarray(synthesize_image(grade, 512, seed=grade).image)
    return out


def _scale(img: Image.Image, factor: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def eyelid_shadow(img: Image.Image) -> Image.Image:
    """Darken (x1/12) a disc of radius 0.39 x side centred on the top edge's midpoint."""
    arr = np.asarray(img).copy()
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    arr[(yy**2 + (xx - w / 2) ** 2) < (0.39 * w) ** 2] //= 12
    return Image.fromarray(arr)


DEFECTS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "blurred (sigma 4 px per 512 px)": (
        "blur",
        lambda im: im.filter(ImageFilter.GaussianBlur(BLUR_SIGMA * max(im.size) / 512)),
    ),
    "dark (x0.15)": ("dark", lambda im: _scale(im, 0.15)),
    "overexposed (x4, two stops)": ("bright", lambda im: _scale(im, 4.0)),
    "channels in BGR order": ("not_fundus", lambda im: Image.fromarray(np.asarray(im)[..., ::-1])),
    "grey-scale (red-free)": ("not_fundus", lambda im: im.convert("L").convert("RGB")),
    "eyelid shadow over the top": ("partial_fov", lambda im: eyelid_shadow(im)),
}


def document_page(size: tuple[int, int] = (850, 1100)) -> Image.Image:
    """A white page with black text-like lines, as from a document scanner."""
    page = Image.new("RGB", size, (250, 250, 247))
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(0)
    for y in range(80, size[1] - 80, 30):
        x = 70
        while x < size[0] - 90:
            width = int(rng.integers(20, 90))
            draw.rectangle((x, y, min(x + width, size[0] - 70), y + 12), fill=(20, 20, 20))
            x += width + 14
    return page


def non_fundus() -> dict[str, tuple[str, Image.Image]]:
    """Frames that are not fundus photographs, with the code the gate must give."""
    from skimage import data

    rng = np.random.default_rng(0)
    lens_cap = np.clip(rng.normal(8, 6, (480, 640, 3)), 0, 255).astype(np.uint8)
    return {
        "cat (skimage chelsea)": ("not_fundus", Image.fromarray(data.chelsea())),
        "coffee (skimage coffee)": ("not_fundus", Image.fromarray(data.coffee())),
        "astronaut (skimage)": ("not_fundus", Image.fromarray(data.astronaut())),
        "rocket (skimage)": ("not_fundus", Image.fromarray(data.rocket())),
        "document scan": ("not_fundus", document_page()),
        "colour noise frame": (
            "not_fundus",
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
        ),
        "sensor noise, lens cap on": ("no_fov", Image.fromarray(lens_cap)),
        "black frame": ("no_fov", Image.new("RGB", (640, 480), (0, 0, 0))),
        "white frame": ("no_fov", Image.new("RGB", (640, 480), (255, 255, 255))),
        "grey frame": ("no_fov", Image.new("RGB", (640, 480), (128, 128, 128))),
    }


def made_up_cases() -> list[dict[str, Any]]:
    """Every made-up photograph with its expected and actual verdict."""
    cases: list[dict[str, Any]] = []

    def add(name: str, expected: str, img: Image.Image) -> None:
        v = assess_quality(prepare_image(img, IMAGE_SIZE))
        cases.append(
            {"image": name, "expected": expected, "code": v.code, "ok": v.code == expected}
        )

    for src_name, src in fundus_sources().items():
        add(f"{src_name} (as is)", "ok", src)
        for defect, (expected, make) in DEFECTS.items():
            add(f"{src_name}, {defect}", expected, make(src))
    for name, (expected, img) in non_fundus().items():
        add(name, expected, img)
    return cases


def blur_sweep() -> list[dict[str, Any]]:
    """Sharpness and verdict of the 512 px retina under increasing Gaussian blur."""
    from skimage import data

    src = Image.fromarray(data.retina()).resize((512, 512), Image.Resampling.LANCZOS)
    out = []
    for sigma in (0.0, *BLUR_SWEEP):
        img = src.filter(ImageFilter.GaussianBlur(sigma)) if sigma else src
        v = assess_quality(prepare_image(img, IMAGE_SIZE))
        out.append({"sigma_px_at_512": sigma, "sharpness": v.measures["sharpness"], "code": v.code})
    return out


# --------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def report_md(result: dict[str, Any]) -> str:
    sets = result["sets"]
    lines = [BEGIN, f"Generated by `python benchmarks/quality.py` on {result['when']}.", ""]
    lines += ["Share of the real photographs each rule rejects (first failing rule counts):", ""]
    lines += ["| verdict | " + " | ".join(f"{s} (n={sets[s]['n']})" for s in sets) + " |"]
    lines += ["| --- |" + " --- |" * len(sets)]
    for code, reason in QUALITY_CODES.items():
        label = f"`{code}`" + (f" ({reason})" if reason else " (gradable)")
        cells = [f"{pct(sets[s]['shares'][code])} ({sets[s]['counts'][code]})" for s in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| all rejections | " + " | ".join(pct(sets[s]["rejected_share"]) for s in sets))
    lines[-1] += " |"
    cases = result["made_up"]
    n_ok = sum(c["ok"] for c in cases)
    lines += ["", f"Made-up photographs: {n_ok} of {len(cases)} get the expected verdict.", ""]
    lines += ["| photograph | expected | verdict |", "| --- | --- | --- |"]
    for c in cases:
        mark = "" if c["ok"] else " **WRONG**"
        lines.append(f"| {c['image']} | `{c['expected']}` | `{c['code']}`{mark} |")
    lines += ["", "Blur sensitivity: `sharpness` of the 512 px retina under Gaussian blur:", ""]
    lines += ["| sigma (px at 512) | sharpness | verdict |", "| --- | --- | --- |"]
    for row in result["blur_sweep"]:
        lines.append(f"| {row['sigma_px_at_512']:g} | {row['sharpness']:.3f} | `{row['code']}` |")
    lines += [
        "",
        "Thresholds in force (`QualityThresholds()` defaults) and where the real photographs",
    ]
    lines += ["lie: the lowest (for a `min_` threshold) or highest (`max_`) value and the 0.5th or"]
    lines += ["99.5th percentile of the measure on each set:", ""]
    lines += ["| threshold | value | measure | " + " | ".join(sets) + " |"]
    lines += ["| --- | --- | --- |" + " --- |" * len(sets)]
    for key, value in result["thresholds"].items():
        measure = THRESHOLD_MEASURE[key]
        ends = ("min", "p0.5") if key.startswith("min_") else ("max", "p99.5")
        cells = []
        for s in sets:
            q = sets[s]["measure_percentiles"][measure]
            cells.append(f"{q[ends[0]]:.3g} / {q[ends[1]]:.3g}")
        lines.append(f"| `{key}` | {value:g} | `{measure}` | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    rewrite_block(path, BEGIN, END, block, "# Screening")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared = Path(args.shared)
    missing = [s for s in SETS if not (shared / s / "labels.csv").is_file()]
    if missing:
        print(
            f"benchmarks/quality.py needs the shared fundus sets {', '.join(SETS)} "
            f"(labels.csv + images/) under {shared}; missing: {', '.join(missing)}. "
            "Pass --shared PATH.",
            file=sys.stderr,
        )
        return 2
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sets = {}
    for name in SETS:
        say(f"gate on {name}")
        sets[name] = run_set(shared / name, args.limit)
    say("made-up bad photographs")
    result = {
        "when": when,
        "thresholds": asdict(QualityThresholds()),
        "sets": sets,
        "made_up": made_up_cases(),
        "blur_sweep": blur_sweep(),
    }
    if args.sheet:
        items = [
            (shared / name / "images" / r["image"], f"{name[:3]} {r['code']} {r['image']}")
            for name in SETS
            for r in sets[name]["rejected"]
        ]
        contact_sheet(items, Path(args.sheet))
        say(f"wrote {args.sheet}")
    write_report(Path(args.out), report_md(result))
    say(f"wrote {args.out}")
    print(json.dumps(result, indent=1))
    return 0 if all(c["ok"] for c in result["made_up"]) else 1


if __name__ == "__main__":
    sys.exit(main())
