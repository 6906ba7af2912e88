"""Leave-one-site-out benchmark over the three development sites (``make bench-sites``).

    python benchmarks/sites.py --loso [--recipes default,site-balance,mixstyle,swad,constant-lr]
        [--few-labels 25,50,100,200]
    python benchmarks/sites.py --loso --quick     # smoke test: 40 images per site, 1 epoch

For each site H of ``aptos2019-224``, ``eyepacs-dev`` and ``idrid-800`` (IDRiD: Porwal et al.,
Data 2018, CC BY 4.0), every recipe trains on the other two (``medtune.train`` with one
``--data`` per site, each split on its own 70/15/15) and is scored on every image of H:
QWK, referable AUC, and referable sensitivity and specificity at the sens90 point chosen on the
training sites' validation images (the worst-site rule), each with its 95% interval, and the
share of each grade of H that point refers (a kept fold without it is scored again). Beside it:

- **shift detection**: the batch shift test (``RUN/batch_shift.npz``) on ``--shift-n`` (100)
  random images of H, ``--shift-draws`` (20) draws: the share flagged; and the same on the
  training sites' held-out TEST images (false alarms at the stated rate, 0.05);
- **label-free recalibration**: ``medtune adapt`` on H's images (unlabelled) with
  ``--recalibrate none|quantile|em-quantile``, scored on H's labels;
- **few labels** (``--few-labels``, first recipe only): ``adapt --labels`` on N images of H
  chosen at random (``--label-draws`` draws) or by ``adapt --suggest N``, scored on the rest
  of H. A fold kept from an earlier invocation without the curve gains it on its trained model;
  ``--refit-batch-test`` fits a kept fold's batch shift test again with the current code and
  measures shift detection again (``shift_commit`` in the JSON).

Last, the recipe trains on all three sites (test split per site) and reports per-site figures.
H's labels are only ever used to score (and as the few-label sample). Prints the JSON result and
rewrites ``<!-- sites-loso:begin -->`` in ``docs/generalisation.md`` (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from benchlib import say
from sites import _ci, _commit, _machine, copy_subset, score

SITES = ("aptos2019-224", "eyepacs-dev", "idrid-800")
TABLE = "sites-loso"
QUICK_N = 40  # images per site with --quick
#: recipe name -> medtune.train settings on top of the default recipe
LOSO_RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "site-balance": {"site_balance": 0.5},
    "mixstyle": {"mixstyle": 0.5},
    "dsu": {"dsu": 0.5},
    "artefact": {"augment": "site,artefact"},  # GDRNet's halo, hole and spot on top
    "swad": {"swad": True, "schedule": "constant"},  # SWAD averages at a constant rate
    "constant-lr": {"schedule": "constant"},  # the control: the rate without the average
    "sord": {"loss": "sord"},  # soft ordinal labels
    "linear-probe": {"strategy": "linear-probe"},
}
LABEL_FREE = ("none", "quantile", "em-quantile")
#: settings of the few-label curve only: a fold kept without them gains the curve on its model
CURVE_SETTINGS = ("few_labels", "label_draws")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--loso`` options of ``benchmarks/sites.py``."""
    p.add_argument("--loso", action="store_true", help="leave-one-site-out over the 3 sites")
    p.add_argument("--shift-n", type=int, default=100, help="images per shift-test batch")
    p.add_argument("--shift-draws", type=int, default=20, help="batches drawn per site")
    p.add_argument(
        "--few-labels", default="", help="comma-separated N for the few-label curve (off: '')"
    )
    p.add_argument("--label-draws", type=int, default=3, help="random samples per N")
    p.add_argument("--image-size", type=int, default=None, help="train at this size")
    p.add_argument(
        "--no-pooled", action="store_true", help="skip the runs trained on all three sites"
    )
    p.add_argument(
        "--held",
        default=",".join(SITES),
        help="comma-separated sites to hold out, one fold each (default all three)",
    )
    p.add_argument(
        "--loso-table",
        default=TABLE,
        help=f"name of the generated block to rewrite (default {TABLE}); another name keeps "
        "the default table, e.g. for a second seed (`--seed 1 --work DIR --loso-table "
        "sites-loso-seed1`)",
    )
    p.add_argument(
        "--refit-batch-test",
        action="store_true",
        help="for folds kept from an earlier invocation: fit each run's batch shift test again "
        "with this commit's code (from its validation images) and measure shift detection again",
    )


def missing(shared: Path) -> list[str]:
    return [s for s in SITES if not (shared / s / "labels.csv").is_file()]


def quick_sites(src: Path, dst: Path, n: int, seed: int) -> Path:
    """About ``n`` images of ``src``, at least 4 of every grade (every class must be splittable
    into train, validation and test), the rest in proportion to the grades."""
    if (dst / "labels.csv").is_file():
        return dst
    labels = pd.read_csv(src / "labels.csv")
    rng = np.random.default_rng(seed)
    names: list[str] = []
    for _, rows in labels.groupby("label"):
        k = min(len(rows), max(4, round(n * len(rows) / len(labels))))
        names += rng.choice(rows["image"].to_numpy(), size=k, replace=False).tolist()
    return copy_subset(src, dst, names)


def run_loso(args: argparse.Namespace) -> dict[str, Any]:
    """Every fold, every recipe; then all three sites pooled."""
    work = args.work / ("loso-quick" if args.quick else "loso")
    data = {s: args.shared / s for s in SITES}
    if args.quick:
        data = {s: quick_sites(p, work / "data" / s, QUICK_N, args.seed) for s, p in data.items()}
    names = [n.strip() for n in (args.recipes or "default").split(",")]
    unknown = [n for n in names if n not in LOSO_RECIPES]
    if unknown:
        raise SystemExit(f"unknown LOSO recipe(s) {unknown}; choose from {', '.join(LOSO_RECIPES)}")
    held_out = [s.strip() for s in args.held.split(",")]
    if set(held_out) - set(SITES):
        raise SystemExit(f"--held {args.held}: choose among {', '.join(SITES)}")
    folds: dict[str, Any] = {}
    for held in [s for s in SITES if s in held_out]:
        for name in names:
            key = f"{name}-without-{held}"
            # the few-label curve is measured for the first recipe only (it is about adapting)
            fargs = (
                args if name == names[0] else argparse.Namespace(**{**vars(args), "few_labels": ""})
            )
            fold = _kept(work, key, fargs)
            if fold is None:
                fold = _saved(work, key, _fold(name, held, data, work, fargs), fargs)
            else:
                fold = _completed(fold, key, data[held], work, fargs)
            folds[f"{name} | {held}"] = fold
    pooled = {}
    for name in [] if args.no_pooled else names:
        pooled[name] = _kept(work, f"{name}-all", args) or _saved(
            work, f"{name}-all", _pooled(name, data, work, args), args
        )
    return {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "seed": args.seed,
        "image_size": args.image_size,
        "machine": _machine(),
        "quick": bool(args.quick),
        "images": {s: len(pd.read_csv(p / "labels.csv")) for s, p in data.items()},
        "folds": folds,
        "pooled": pooled,
    }


def _completed(fold: dict[str, Any], key: str, held: Path, work: Path, args) -> dict[str, Any]:
    """A kept fold with what later commits measure added on its kept model (saved again): the
    few-label curve, the batch test refitted (``--refit-batch-test``), the grades referred."""
    run, before = str(work / "runs" / key), json.dumps(fold, sort_keys=True)
    if args.few_labels and "few_labels" not in fold and "label_free" in fold:
        fold["few_labels"] = few_label_curve(run, held, work, args)
        fold["few_labels_commit"] = _commit()
    if args.refit_batch_test and fold.get("shift_commit") != _commit():
        refit_batch_test(run)
        fold["shift"] = shift_detection(run, held, args)
        fold["shift_commit"] = _commit()
    if fold["scores"]["sens90"].get("referred_by_class") is None:
        # only the new key: the kept figures stay those of the commit that made them
        again = score(run, held, "none", f"loso-{held.name}", args)["sens90"]
        fold["scores"]["sens90"]["referred_by_class"] = again["referred_by_class"]
    if json.dumps(fold, sort_keys=True) != before:
        _saved(work, key, fold, args, commit=fold.get("commit"))
    return fold


def _fold(name: str, held: str, data: dict[str, Path], work: Path, args) -> dict[str, Any]:
    """Train ``name`` without ``held``, then score it there (module docstring)."""
    train_on = [data[s] for s in SITES if s != held]
    run, seconds = _train(train_on, work / "runs" / f"{name}-without-{held}", name, args)
    say(f"score {name} on held-out {held}")
    fold = {"recipe": name, "held_out": held, "train_seconds": seconds}
    fold["scores"] = score(run, data[held], "none", f"loso-{held}", args)
    fold["shift"] = shift_detection(run, data[held], args)
    if LOSO_RECIPES[name].get("strategy") != "linear-probe":  # adapt refuses probes
        fold["label_free"] = label_free(run, data[held], work, args)
        if args.few_labels:
            fold["few_labels"] = few_label_curve(run, data[held], work, args)
    return fold


def _pooled(name: str, data: dict[str, Path], work: Path, args) -> dict[str, Any]:
    run, seconds = _train(list(data.values()), work / "runs" / f"{name}-all", name, args)
    return {"train_seconds": seconds, "test": _per_site_test(run, args)}


def _kept(work: Path, key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """A fold finished by an earlier, interrupted invocation with the same settings."""
    path = work / "done" / f"{key}.json"
    if args.quick or not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    same = {k: v for k, v in _settings(args).items() if k not in CURVE_SETTINGS}
    kept = saved.get("settings") or {}
    if {k: v for k, v in kept.items() if k not in CURVE_SETTINGS} != same:
        return None
    result = saved["result"]
    if "few_labels" in result and any(kept.get(k) != getattr(args, k) for k in CURVE_SETTINGS):
        del result["few_labels"]  # made with other N or draws: made again on the kept model
    say(f"{key}: kept from {path}")
    return result


def _saved(work: Path, key: str, result: dict[str, Any], args, commit: str | None = None) -> dict:
    """Keep a finished fold (atomically, with the commit it ran on), so an interrupted
    benchmark resumes after it."""
    from medtune.io import write_json

    result = {**result, "commit": commit or _commit()}
    write_json(work / "done" / f"{key}.json", {"settings": _settings(args), "result": result})
    return result


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("seed", "image_size", "few_labels", "label_draws", "shift_n", "shift_draws")
    return {k: getattr(args, k, None) for k in keys}


def _train(sites: list[Path], out: Path, name: str, args: argparse.Namespace) -> tuple[str, float]:
    import medtune

    settings: dict[str, Any] = {"seed": args.seed, "progress": False, **LOSO_RECIPES[name]}
    if args.quick:
        settings.update(epochs=1, image_size=args.image_size or 64)
    elif args.image_size:
        settings["image_size"] = args.image_size
    if out.exists():
        shutil.rmtree(out)
    say(f"train {name} on {', '.join(p.name for p in sites)}")
    started = time.perf_counter()
    medtune.train([str(p) for p in sites], out=str(out), cache_dir=str(args.work / "cache"),
                  **settings)  # fmt: skip
    return str(out), round(time.perf_counter() - started, 1)


def shift_detection(run: str, held: Path | list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Share of ``--shift-draws`` batches of ``--shift-n`` images flagged by the batch shift
    test: from the held-out site(s), and from each training site's held-out test images."""
    from medtune.data import Part
    from medtune.deploy.engine import run_scorer
    from medtune.evaluation.scoring import score
    from medtune.runs import RunFolder
    from medtune.runs.data import prepare_run_data, prepare_source

    folder = RunFolder(run)
    test = folder.read_batch_shift()
    scorer = run_scorer(folder)
    card = scorer.card
    config = folder.read_config()

    def outputs(part: Part) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scored = score(scorer, part.images, features=True)
        patients = np.asarray(part.groups or [""] * len(part), dtype=str)
        return scored.features, card.probabilities(scored.plain), patients

    batches = {}
    for site in held if isinstance(held, list) else [held]:
        cache = prepare_source(str(site), config, Path(run), classes=card.class_names,
                               progress=False)  # fmt: skip
        batches[site.name] = outputs(Part(cache, np.arange(len(cache))))
    home = prepare_run_data(config, Path(run)).test
    if home is not None:
        feats, probs, patients = outputs(home)
        sites = np.asarray(home.sites or [""] * len(home), dtype=str)
        for site in sorted(set(sites.tolist())):
            rows = sites == site
            batches[f"{site or 'home'} (held-out test images)"] = (
                feats[rows], probs[rows], patients[rows]
            )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    out = {}
    for name, (feats, probs, patients) in batches.items():
        n = min(args.shift_n, len(feats))
        verdicts = [
            test.test(feats[rows], probs[rows], patients[rows])
            for rows in (
                rng.choice(len(feats), size=n, replace=False) for _ in range(args.shift_draws)
            )
        ]
        out[name] = {
            "n": n,
            "draws": args.shift_draws,
            "share_flagged": float(np.mean([v["shifted"] for v in verdicts])),
            "median_p": float(np.median([v["p_value"] for v in verdicts])),
        }
    return out


def refit_batch_test(run: str) -> None:
    """Fit ``RUN/batch_shift.npz`` again from the run's validation images, as this commit's
    finalisation does (a kept fold's test was fitted by the code of its own commit)."""
    from medtune.deploy.engine import run_scorer
    from medtune.engines.finalize import fit_batch_shift
    from medtune.evaluation.scoring import score
    from medtune.runs import RunFolder
    from medtune.runs.data import prepare_run_data

    folder = RunFolder(run)
    say(f"refit the batch shift test of {folder.dir.name}")
    scorer = run_scorer(folder)
    val = prepare_run_data(folder.read_config(), folder.dir).val
    scored = score(scorer, val.images, features=True)
    probs = scorer.card.probabilities(scored.plain)
    folder.write_batch_shift(fit_batch_shift(scored.features, probs, val))


def label_free(run: str, held: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Sensitivity/specificity at sens90 on H after ``adapt --recalibrate`` with each method."""
    import medtune

    out = {}
    for method in LABEL_FREE:
        target = work / "adapted" / f"{Path(run).name}-{method}"
        if target.exists():
            shutil.rmtree(target)
        say(f"adapt {Path(run).name} on {held.name} unlabelled, recalibrate {method}")
        adapted = medtune.adapt(run, str(held), str(target), recalibrate=method, progress=False)
        m = medtune.evaluate(str(target), str(held), n_boot=args.bootstrap, gradcam=False,
                             progress=False, name=f"loso-{method}").metrics  # fmt: skip
        point = (m.get("label_free_operating_points") or m.get("operating_points") or {})["sens90"]
        out[method] = {
            "referable_auc": m.get("referable_auc"),
            **{
                k: point.get(k)
                for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci")
            },  # fmt: skip
            "status": adapted.record["operating_point_status"]["status"],
        }
    return out


def few_label_curve(run: str, held: Path, work: Path, args: argparse.Namespace) -> dict:
    """``adapt --labels`` on N images of H (random draws, or ``--suggest N``), scored on the
    rest of H: sensitivity/specificity at sens90 and referable AUC."""
    import medtune

    labels = pd.read_csv(held / "labels.csv")
    rng = np.random.default_rng(args.seed)
    curve: dict[str, Any] = {}
    for n in [int(x) for x in args.few_labels.split(",")]:
        if n >= len(labels):
            continue
        picks = {f"random-{d}": rng.choice(labels["image"], n, replace=False).tolist()
                 for d in range(args.label_draws)}  # fmt: skip
        suggested = work / "suggest" / f"{Path(run).name}-{n}"
        if suggested.exists():
            shutil.rmtree(suggested)
        medtune.adapt(run, str(held), str(suggested), suggest=n, progress=False)
        picks["suggested"] = [
            Path(p).name for p in pd.read_csv(suggested / "suggested.csv")["image"]
        ]
        for how, names in picks.items():
            curve[f"{n} {how}"] = _with_sample(run, held, names, work / "few" / f"{n}-{how}", args)
    return curve


def _with_sample(run: str, held: Path, names: list[str], work: Path, args) -> dict[str, Any]:
    import medtune

    if work.exists():
        shutil.rmtree(work)
    sample = copy_subset(held, work / "sample", names)
    rest = copy_subset(held, work / "rest", sorted(set(pd.read_csv(held / "labels.csv")["image"])
                                                    - set(names)))  # fmt: skip
    try:
        medtune.adapt(run, str(held), str(work / "run"), labels=str(sample), progress=False)
    except medtune.errors.MedtuneError as err:  # too few positives in the sample
        return {"error": str(err)}
    m = medtune.evaluate(str(work / "run"), str(rest), n_boot=args.bootstrap, gradcam=False,
                         progress=False).metrics  # fmt: skip
    op = m["operating_points"]["sens90"]
    return {"n_rest": m["n"], "referable_auc": m.get("referable_auc"),
            **{k: op.get(k) for k in ("sensitivity", "sensitivity_ci", "specificity")}}  # fmt: skip


def _per_site_test(run: str, args: argparse.Namespace) -> dict[str, Any]:
    import medtune

    m = medtune.evaluate(run, n_boot=args.bootstrap, gradcam=False, progress=False).metrics
    out = {}
    for site, s in (m.get("per_site") or {}).items():
        op = (s.get("operating_points") or {}).get("sens90", {})
        out[site] = {"n": s.get("n"), "qwk": s.get("qwk"), "qwk_ci": s.get("qwk_ci"),
                     "referable_auc": s.get("referable_auc"),
                     "referable_auc_ci": s.get("referable_auc_ci"),
                     **{k: op.get(k) for k in ("sensitivity", "sensitivity_ci", "specificity",
                                               "specificity_ci")}}  # fmt: skip
    return out


def table_md(result: dict[str, Any]) -> str:
    """The leave-one-site-out table, then the pooled run's per-site test figures."""
    lines = [
        "| recipe | held-out site (n) | QWK | referable AUC | sens / spec at sens90 | "
        "flagged (100 images) | false alarms (training sites) | sens / spec after adapt: "
        "none, quantile, em-quantile | train s |",
        "|" + "---|" * 9,
    ]
    for fold in result["folds"].values():
        s, shift = fold["scores"], fold["shift"]
        held = shift.get(fold["held_out"], {}).get("share_flagged")
        alarms = [v["share_flagged"] for k, v in shift.items() if k != fold["held_out"]]
        free = fold.get("label_free") or {}
        adapted = "; ".join(
            f"{_ci(v['sensitivity'], None)} / {_ci(v['specificity'], None)}" for v in free.values()
        )
        op = s["sens90"]
        lines.append(
            f"| {fold['recipe']} | {fold['held_out']} ({s['n']}) | {_ci(s['qwk'], s['qwk_ci'])} | "
            f"{_ci(s['referable_auc'], s['referable_auc_ci'])} | "
            f"{_ci(op['sensitivity'], op['sensitivity_ci'])} / "
            f"{_ci(op['specificity'], op['specificity_ci'])} | "
            f"{'n/a' if held is None else f'{held:.0%}'} | "
            f"{', '.join(f'{a:.0%}' for a in alarms) or 'n/a'} | {adapted or 'n/a'} | "
            f"{fold['train_seconds']:.0f} |"
        )
    if result["pooled"]:
        lines += ["", "| recipe (all three sites) | site (test n) | QWK | referable AUC | "
                  "sens / spec at sens90 |", "|---|---|---|---|---|"]  # fmt: skip
    for name, pooled in result["pooled"].items():
        for site, s in pooled["test"].items():
            lines.append(
                f"| {name} | {site} ({s['n']}) | {_ci(s['qwk'], s['qwk_ci'])} | "
                f"{_ci(s['referable_auc'], s['referable_auc_ci'])} | "
                f"{_ci(s['sensitivity'], s['sensitivity_ci'])} / "
                f"{_ci(s['specificity'], s['specificity_ci'])} |"
            )
    return "\n".join(lines + grades_md(result) + few_labels_md(result))


def grades_md(result: dict[str, Any]) -> list[str]:
    """Per fold, the share of each true grade of the held-out site referred at sens90."""
    rows, grades = [], None
    for fold in result["folds"].values():
        by = fold["scores"]["sens90"].get("referred_by_class")
        if not by:
            continue
        grades = grades or list(by)
        cells = [f"{by[g]['share']:.2f} ({by[g]['referred']}/{by[g]['n']})" if by[g]["n"] else
                 "n/a" for g in grades]  # fmt: skip
        rows.append(f"| {fold['recipe']} | {fold['held_out']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = " | ".join(f"grade {g}" for g in grades)
    return ["", "Share of each true grade of the held-out site referred at the sens90 point "
            "(referred / images):", "", f"| recipe | held-out site | {head} |",
            "|---" * (len(grades) + 2) + "|", *rows]  # fmt: skip


def few_labels_md(result: dict[str, Any]) -> list[str]:
    """The few-label curve: held-out site, N and how chosen, figures on the rest of the site."""
    rows = [
        f"| {fold['held_out']} | {key} | "
        + (
            f"{_ci(r['sensitivity'], r['sensitivity_ci'])} / {_ci(r['specificity'], None)} | "
            f"{_ci(r['referable_auc'], None)} |"
            if "error" not in r
            else "too few positives in the sample | |"
        )
        for fold in result["folds"].values()
        for key, r in (fold.get("few_labels") or {}).items()
    ]
    if not rows:
        return []
    return ["", "| held-out site | labelled images | sens / spec at sens90 on the rest | "
            "referable AUC |", "|---|---|---|---|", *rows]  # fmt: skip


def report_md(result: dict[str, Any], table: str = TABLE) -> str:
    images = ", ".join(f"{n} {s}" for s, n in result["images"].items())
    size = f", trained at {result['image_size']} px" if result.get("image_size") else ""
    return "\n".join([
        f"<!-- {table}:begin -->",
        f"Generated by `make bench-sites` (`python benchmarks/sites.py --loso`) on "
        f"{result['when']}, commit {result['commit']}, seed {result.get('seed', 0)}{size}, "
        f"{result['machine']}. Images: {images}.",
        "",
        table_md(result),
        f"<!-- {table}:end -->",
    ])  # fmt: skip
