"""Arguments and handlers of each ``medtune`` command; each handler calls one API function."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.cli.settings import FUNDUS_HELP, add_setting_flags, flag_settings, fundus_options
from medtune.cli.worklist_commands import (
    add_db_flags,
    add_users,
    add_worklist,
    run_users,
    run_worklist,
)
from medtune.config import DEFAULT_OPERATING_POINT, ENGINES, OPERATING_POINTS, TTA_MODES


# ----------------------------------------------------------------------------------- prepare
def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="class folders, a folder with labels.csv, a CSV file, or a MedMNIST .npz",
    )
    p.add_argument(
        "--image-size", type=int, default=224, help="output side in pixels (default 224)"
    )
    p.add_argument(  # the name medtune 0.1 used
        "--size", dest="image_size", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    p.add_argument(
        "--fundus",
        type=fundus_options,
        default=fundus_options("crop"),
        help=f"fundus preprocessing: {FUNDUS_HELP} (default crop: field-of-view crop, colours "
        "untouched)",
    )
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: inline)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images (listed in skipped.csv) instead of failing",
    )


def run_prepare(args: argparse.Namespace) -> None:
    import time

    from medtune.data import load_imageset, prepare
    from medtune.data.fundus import FundusOptions

    started = time.perf_counter()
    imageset = load_imageset(args.data, skip_bad=args.skip_bad)
    cache = prepare(
        imageset,
        args.image_size,
        FundusOptions.from_dict(args.fundus),
        Path(args.out),
        skip_bad=args.skip_bad,
        num_workers=args.workers,
    )
    seconds = time.perf_counter() - started
    print(
        f"prepared {len(cache)} images ({len(cache.skipped)} skipped) in {seconds:.1f} s: "
        f"{cache.dir}"
    )


# ----------------------------------------------------------------------------------- train
TRAIN_EPILOG = (
    "Defaults are those of docs/configuration.md (medtune.TrainConfig); a --config "
    "file replaces them (the preset it names lies beneath its own values), --preset applies "
    "over both, and a flag given overrides everything, whatever its value. Environment: "
    "MEDTUNE_CACHE sets the cache folder (default ~/.cache/medtune/prepared); "
    "MLFLOW_TRACKING_URI, when set, also logs fine-tuning metrics to that MLflow server (needs "
    "the mlflow package). --epochs applies to --strategy finetune only."
)


def add_train(p: argparse.ArgumentParser) -> None:
    p.epilog = TRAIN_EPILOG
    p.add_argument("--config", help="a config.yaml (e.g. RUN/config.yaml); flags override it")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted fine-tuning run with its own settings "
        "(with --epochs N: extend a finished one to N epochs; a finished run without a new "
        "--epochs is left as it is, exit 0)",
    )
    add_setting_flags(p)  # one flag per TrainConfig setting, generated from its field


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, whatever their value (flags left out keep the
    config file's, the preset's or the default values)."""
    return flag_settings(args)


def run_train(args: argparse.Namespace) -> None:
    from medtune.config import TrainConfig
    from medtune.errors import MedtuneError
    from medtune.workflows.train import build_config, resume, run_training

    if args.resume:
        given = train_overrides(args)
        epochs = given.pop("epochs", None)
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            raise MedtuneError(
                f"--resume continues {args.resume} with its own settings and ignores {flags}; "
                "drop them (--epochs N extends the run), or train a new run with --config"
            )
        result = resume(args.resume, epochs=epochs)
    else:
        config = TrainConfig.load(args.config) if args.config else None
        result = run_training(build_config(config, **train_overrides(args)))
    print_run(result)


def print_run(result: Any) -> None:
    from medtune.evaluation.tables import metrics_table

    if not result.is_global_zero:  # other DDP processes: rank 0 prints the results
        return
    print(metrics_table(result.metrics, synthetic=result.config.synthetic))
    print(f"run folder: {result.dir}  ({result.seconds:.1f} s)")


# ----------------------------------------------------------------------------------- demo
def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="run the demo on real data instead of the synthetic set")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")


def run_demo(args: argparse.Namespace) -> None:
    from medtune.workflows.demo import run_demo as demo

    demo(out=args.out, data=args.data, epochs=args.epochs)


# ----------------------------------------------------------------------------------- evaluate
def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run folder made by medtune train")
    p.add_argument("--data", help="labelled test images (default: the run's own test split)")
    _add_tta(p)
    _add_engine(p)
    p.add_argument("--name", help="output name under RUN/eval/ (default from the data)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the CIs of AUC, kappa and balanced accuracy "
        "(proportions get Wilson intervals); 0 turns every interval off",
    )
    p.add_argument("--no-gradcam", action="store_true", help="leave Grad-CAM out of the report")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    _add_patient_rule(p)


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="test-time augmentation: rot90 averages the four rotations",
    )


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnx",
        help="what scores a run's images: onnx (ONNX Runtime on the run's fp32 graph, "
        "RUN/model.onnx) or torch (PyTorch eager fp32: the same probabilities to 1e-4, slower) "
        "(default: onnx)",
    )


def _add_model_source(p: argparse.ArgumentParser, run_note: str, model_note: str) -> None:
    """``--run RUN`` or ``--model model.onnx``, exactly one (``predict``, ``serve``)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help=f"a run folder {run_note}")
    source.add_argument("--model", help=f"an exported model.onnx {model_note}")


def _add_operating_point(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--operating-point",
        choices=tuple(OPERATING_POINTS),
        default=DEFAULT_OPERATING_POINT,
        help=text,
    )


def _add_patient_rule(p: argparse.ArgumentParser) -> None:
    from medtune.evaluation.patients import DEFAULT_PATIENT_RULE, PATIENT_RULES  # numpy only

    p.add_argument(
        "--patient-rule",
        choices=tuple(PATIENT_RULES),
        default=DEFAULT_PATIENT_RULE,
        help="per-patient answer: refer when either eye is referable; insufficient quality "
        "when no eye (either-eye, default) or not both eyes (both-eyes) could be graded",
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from medtune.evaluation.tables import metrics_table
    from medtune.workflows.evaluate import evaluate

    result = evaluate(
        args.run,
        args.data,
        tta=args.tta,
        name=args.name,
        n_boot=args.bootstrap,
        gradcam=not args.no_gradcam,
        skip_bad=args.skip_bad,
        patient_rule=args.patient_rule,
        engine=args.engine,
    )
    synthetic = "synthetic" in str(result.metrics.get("data", "")).lower()
    print(metrics_table({"test": result.metrics}, synthetic=synthetic))
    patients = result.metrics.get("patients")
    if patients:
        print(_patients_line(patients))
    print(f"metrics: {result.metrics_path}\nreport: {result.report}")


def _patients_line(pm: dict[str, Any]) -> str:
    """Patient-level figures in one line (``metrics["patients"]``)."""

    def pct(key: str) -> str:
        value, ci = pm.get(key), pm.get(f"{key}_ci")
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    return (
        f"patients ({pm['n_patients']}, {pm['rule']} rule, {pm['headline_operating_point']}): "
        f"sensitivity {pct('sensitivity')}, specificity {pct('specificity')}, "
        f"insufficient quality {pm['n_insufficient']} ({pct('insufficient_share')})"
    )


# ----------------------------------------------------------------------------------- predict
def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or globs")
    _add_model_source(p, "(PyTorch model)", "(ONNX Runtime, no PyTorch)")
    p.add_argument(
        "--out", help="write predictions to this CSV, and what they mean to OUT.meta.json"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the predictions and their meaning as JSON to PATH (no PATH: print them)",
    )
    _add_operating_point(
        p,
        "validated threshold for the refer column (default: sens90, the most specific "
        "threshold with >= 90%% sensitivity for referable disease on validation: screening)",
    )
    p.add_argument("--explain", metavar="DIR", help="write Grad-CAM figures into DIR")
    p.add_argument(
        "--quality-model",
        metavar="RUN",
        help="a run trained on image-quality grades (e.g. Good/Usable/Reject folders): images "
        "it calls Reject are ungradable too, beside the rule-based quality gate",
    )
    _add_tta(p)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed predict (the same command with --resume): batches it finished, "
        "kept in OUT.journal.jsonl, are not predicted again",
    )
    p.add_argument(
        "--manifest",
        metavar="CSV",
        help="image,patient_id,eye per image (default: DICOM PatientID + ImageLaterality, or "
        "names like 17_left.jpeg / P1_OD.jpg); with --out, patients and eyes go to "
        "OUT.patients.csv and OUT.eyes.csv; the batch shift test counts a patient's images "
        "once",
    )
    _add_patient_rule(p)
    _add_engine(p)


def run_predict(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from medtune.workflows.predict import predict, to_csv

    to_stdout = args.json == "-"
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "predictions.json" if to_stdout else args.json
        rows = predict(
            args.inputs,
            run=args.run,
            model_path=args.model,
            out=args.out,
            json_path=json_path,
            explain=args.explain,
            quality_model=args.quality_model,
            operating_point=args.operating_point,
            tta=args.tta,
            skip_bad=args.skip_bad,
            resume=args.resume,
            manifest=args.manifest,
            patient_rule=args.patient_rule,
            engine=args.engine,
        )
        if to_stdout:  # the same document as --json PATH
            print(Path(json_path).read_text(encoding="utf-8"), end="")
            return
    if args.out or args.json:
        print(f"{len(rows)} predictions written to {args.out or args.json}")
    else:
        print(to_csv(rows), end="")


# ----------------------------------------------------------------------------------- export
def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run folder made by medtune train")
    p.add_argument(
        "--format", choices=["onnx", "torchscript"], default="onnx", help="model file format"
    )
    p.add_argument("--out", help="output folder (default RUN/export)")


def run_export(args: argparse.Namespace) -> None:
    from medtune.workflows.export import export

    result = export(args.run, args.format, args.out)
    print(
        f"exported {result.model_path} (+ {result.sidecar_path.name}); parity max |dp| = "
        f"{result.max_abs_diff:.2e} on {result.n_parity_images} images"
    )


# ----------------------------------------------------------------------------------- adapt
def add_adapt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a fine-tuning run folder (left unchanged)")
    p.add_argument(
        "--data",
        required=True,
        help="the new site's images: a folder (searched recursively) or a labelled set "
        "(labels ignored)",
    )
    p.add_argument("--out", required=True, help="the new run folder to write")
    p.add_argument(
        "--labels",
        help="a small labelled RANDOM sample of the new site: refits the temperature and moves "
        "the operating points so the validated sensitivity holds there (needs 10+ positives); "
        "a sample whose scores differ from the site's (KS test) leaves them marked 'operating "
        "point not validated here'",
    )
    p.add_argument(
        "--recalibrate",
        choices=["none", "quantile", "em-quantile"],
        default="none",
        help="without --labels: move the operating points onto the site's unlabelled scores "
        "(quantile mapping at the validation prevalence, or at one estimated by EM); marked "
        "'operating point not validated here' (default none)",
    )
    p.add_argument(
        "--suggest",
        type=int,
        default=0,
        metavar="N",
        help="write the N most uncertain, diverse images to OUT/suggested.csv; not a random "
        "sample: give --labels a random sample of the site, not these alone "
        "(docs/generalisation.md)",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="with --labels: also fine-tune the head and last stage on the sample mixed with "
        "the source's training images (home figures before/after in adaptation.json)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per AdaBN batch")


def run_adapt(args: argparse.Namespace) -> None:
    from medtune.workflows.adapt import adapt

    result = adapt(
        args.run,
        args.data,
        args.out,
        labels=args.labels,
        recalibrate=args.recalibrate,
        suggest=args.suggest,
        finetune=args.finetune,
        batch_size=args.batch_size,
    )
    print(result.summary)
    tuned = result.record.get("finetune")
    if tuned:
        home = tuned["home"]
        pairs = [
            f"{k} {home['before'][k]:.3f} -> {home['after'][k]:.3f}"
            for k in home["after"]
            if home["before"].get(k) is not None and home["after"][k] is not None
        ]
        print(f"home site after fine-tuning ({home['images']}): {', '.join(pairs)}")
    if result.suggested_path is not None:
        print(f"images to label first: {result.suggested_path}")
        print(
            "  chosen as uncertain and diverse, not at random: operating points moved on them "
            "alone fell short of their sensitivity; give --labels a random sample of the site"
        )
    print(f"run folder: {result.dir}")


# ----------------------------------------------------------------------------------- advise
def add_advise(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the labelled image set to measure")
    p.add_argument("--backbones", help="comma-separated backbones (default efficientnet_lite0)")
    p.add_argument("--json", help="also write the advice as JSON here")
    add_setting_flags(p, ["image_size", "fundus", "cache_dir", "skip_bad"])  # as medtune train


def run_advise(args: argparse.Namespace) -> None:
    from medtune.config import TrainConfig
    from medtune.workflows.advise import advise

    backbones = args.backbones.split(",") if args.backbones else None
    config = TrainConfig(**flag_settings(args))
    report = advise(args.data, backbones, config=config, json_path=args.json)
    print(report.text())


# ----------------------------------------------------------------------------------- serve
def add_serve(p: argparse.ArgumentParser) -> None:
    _add_model_source(p, "(PyTorch model; the page shows Grad-CAM)", "(ONNX Runtime, faster)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this computer only; any other address needs "
        "a user, see medtune users add, and TLS in front)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_tta(p)
    _add_operating_point(
        p, "validated threshold that sets the referral flag (default sens90, as predict)"
    )
    p.add_argument("--workers", type=int, help="batches predicted at once (default 1 run, 2 ONNX)")
    p.add_argument("--max-files", type=int, default=50, help="images per request")
    p.add_argument("--max-file-mb", type=float, default=25.0, help="MiB per image")
    add_db_flags(p)
    p.add_argument(
        "--keep-images",
        action="store_true",
        help="keep screened photographs in DATA_DIR/images (content-addressed) so reviewed ones "
        "can be exported for training (medtune worklist export --reviewed)",
    )
    # keep the examples' line breaks, and the defaults the parser's own formatter adds
    p.formatter_class = type(
        "ServeHelpFormatter", (argparse.RawDescriptionHelpFormatter, p.formatter_class), {}
    )
    p.epilog = (
        "examples:\n"
        "  medtune serve --model runs/dr/export/model.onnx   # then open http://127.0.0.1:8000/\n"
        "  medtune serve --run runs/dr --port 8080            # PyTorch, with Grad-CAM\n"
        "  medtune users add ann --role admin                 # then log in on the page\n"
        "  curl -H 'Authorization: Bearer TOKEN' -F patient=P17 -F files=@p17_left.jpg \\\n"
        "       http://127.0.0.1:8000/api/predict          # TOKEN: medtune users token ann\n"
        "docs/screening.md describes the page, the JSON endpoint and the limits."
    )


def run_serve(args: argparse.Namespace) -> None:
    from medtune.workflows.serve import UploadLimits, serve

    limits = UploadLimits(
        max_files=args.max_files,
        max_file_mb=args.max_file_mb,
        max_request_mb=max(200.0, args.max_files * args.max_file_mb + 1),
    )
    serve(
        run=args.run,
        model_path=args.model,
        host=args.host,
        port=args.port,
        tta=args.tta,
        operating_point=args.operating_point,
        limits=limits,
        workers=args.workers,
        db=args.db,
        folder=args.data_dir,
        keep_images=args.keep_images,
        log_level="info" if args.verbose else "warning",
    )


COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]
] = {
    "demo": (
        "run the main job end to end (synthetic fundus set unless --data)",
        add_demo,
        run_demo,
    ),
    "prepare": ("decode, preprocess and cache every image once", add_prepare, run_prepare),
    "train": ("train a model with one of the four transfer scenarios", add_train, run_train),
    "evaluate": ("clinical metrics with 95% CIs and an HTML report", add_evaluate, run_evaluate),
    "predict": (
        "predict image files with a run or an exported ONNX model",
        add_predict,
        run_predict,
    ),
    "export": (
        "export a run's model to ONNX or TorchScript (parity-checked)",
        add_export,
        run_export,
    ),
    "adapt": (
        "adapt a fine-tuned run to a new site (AdaBN on its unlabelled images; --labels "
        "moves the operating points)",
        add_adapt,
        run_adapt,
    ),
    "advise": ("measure a data set and recommend a transfer scenario", add_advise, run_advise),
    "serve": (
        "a web page and JSON endpoint for screening patients, with a worklist and logins "
        "(loopback by default)",
        add_serve,
        run_serve,
    ),
    "users": ("add, delete and list the users of serve; API tokens", add_users, run_users),
    "worklist": (
        "export serve's worklist (CSV, or the graders' grades as a labelled set)",
        add_worklist,
        run_worklist,
    ),
}
