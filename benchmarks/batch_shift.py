"""Does the batch shift test notice a new site from 100 images, and stay quiet at home?

    python benchmarks/batch_shift.py [--shared PATH] [--train-n 1000] [--strategy linear-probe]

Trains one run on ``aptos2019-224`` (a stratified subset of ``--train-n`` images, 70/15/15
split; default a linear probe, the cheapest recipe), then draws ``--shift-draws`` random batches
of ``--shift-n`` images from ``eyepacs-dev``, from ``idrid-800`` and from APTOS's held-out test
split, and reports the share of batches the run's batch shift test
(:class:`medtune.evaluation.shift.BatchShiftTest`, stated false-alarm rate 0.05) flags. Prints
JSON; writes nothing into the docs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import REPO, say
from sites_loso import SITES, quick_sites, shift_detection


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/medtune-bench-batch-shift"))
    p.add_argument("--train-n", type=int, default=1000, help="APTOS images to train on (0: all)")
    p.add_argument("--strategy", default="linear-probe")
    p.add_argument("--shift-n", type=int, default=100)
    p.add_argument("--shift-draws", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    missing = [s for s in SITES if not (args.shared / s / "labels.csv").is_file()]
    if missing:
        print(f"needs {', '.join(SITES)} under {args.shared}; missing {missing}", file=sys.stderr)
        return 2
    import medtune

    home = args.shared / SITES[0]
    if args.train_n:
        home = quick_sites(home, args.work / "data" / SITES[0], args.train_n, args.seed)
    run = args.work / f"run-{args.strategy}-{args.train_n}"
    started = time.perf_counter()
    if not (run / "batch_shift.npz").is_file():
        say(f"train {args.strategy} on {home}")
        medtune.train(str(home), out=str(run), strategy=args.strategy, seed=args.seed,
                      cache_dir=str(args.work / "cache"), progress=False)  # fmt: skip
    result = {"run": str(run), "train_seconds": round(time.perf_counter() - started, 1)}
    say(f"batches of {args.shift_n} from {', '.join(SITES[1:])} and APTOS's held-out test images")
    result.update(shift_detection(str(run), [args.shared / s for s in SITES[1:]], args))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
