"""One contender's task in its own process: ``worker.py CONTENDER TASK SPEC.json OUT.json``.

A process per task keeps the peak resident memory of each one separate.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from benchlib import Spec, say, write_result

CONTENDERS = {"medtune": "bench_medtune", "fastai": "bench_fastai", "plain": "bench_plain"}


def main(argv: list[str]) -> int:
    contender, task, spec_path, out_path = argv
    module = importlib.import_module(CONTENDERS[contender])
    for name in module.IMPORTS:  # library import time is not part of any figure
        importlib.import_module(name)
    spec = Spec.from_json(spec_path)
    started, load = time.perf_counter(), os.getloadavg()[0]
    say(f"{contender} {task}: start (load average {load:.1f})")
    result = module.TASKS[task](spec)
    result["process_s"] = time.perf_counter() - started
    result["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    write_result(out_path, result)
    say(f"{contender} {task}: done in {result['process_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
