"""Run every transfer scenario on one data set and compare with what the advisor chose.

    python benchmarks/advisor_regret.py --data runs/demo/synthetic-data --out runs/advisor/demo

Prints JSON (and a Markdown table row set) with, per scenario, wall seconds and validation /
test QWK, and the advisor's regret: the best scenario's test QWK minus the chosen one's, and the
minutes spent beyond the fastest scenario within 0.01 QWK of the best. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCENARIOS = {
    1: {"strategy": "linear-probe"},
    2: {"strategy": "finetune", "freeze": 2, "backbone_lr_mult": 0.1},
    3: {"strategy": "layer-probe", "layer": "best"},
    4: {"strategy": "finetune", "freeze": 0, "backbone_lr_mult": 0.5},
}


def run_all(data: str, out: Path, epochs: int) -> dict:
    from medtune.config import TrainConfig
    from medtune.workflows.advise import advise
    from medtune.workflows.train import train

    started = time.perf_counter()
    advice = advise(data, config=TrainConfig(data=data, progress=False)).to_dict()
    advise_seconds = time.perf_counter() - started
    results = {}
    for scenario, settings in SCENARIOS.items():
        run = train(
            data=data,
            out=str(out / f"scenario{scenario}"),
            epochs=epochs,
            progress=False,
            **settings,
        )
        results[scenario] = {
            "settings": settings,
            "seconds": round(run.seconds, 1),
            "val_qwk": run.metrics["val"].get("qwk"),
            "test_qwk": run.metrics.get("test", {}).get("qwk"),
        }
    return {
        "data": data,
        "advice": advice,
        "advise_seconds": round(advise_seconds, 1),
        "scenarios": results,
        **regret(advice["scenario"], results),
    }


def regret(chosen: int, results: dict) -> dict:
    best = max(r["test_qwk"] for r in results.values())
    good_enough = [r["seconds"] for r in results.values() if r["test_qwk"] >= best - 0.01]
    return {
        "chosen_scenario": chosen,
        "qwk_regret": round(best - results[chosen]["test_qwk"], 4),
        "minutes_regret": round((results[chosen]["seconds"] - min(good_enough)) / 60, 2),
    }


def markdown(report: dict) -> str:
    lines = [
        "| scenario | settings | minutes | val QWK | test QWK | advisor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for scenario, r in report["scenarios"].items():
        mark = "chosen" if int(scenario) == report["chosen_scenario"] else ""
        settings = " ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(
            f"| {scenario} | {settings} | {r['seconds'] / 60:.1f} | {r['val_qwk']:.3f} "
            f"| {r['test_qwk']:.3f} | {mark} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/advisor")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    report = run_all(args.data, Path(args.out), args.epochs)
    print(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
