"""medtune.runs: the run folder (every file of a run) and the prepared data of a run.

Layer 5 of the package (``docs/architecture.md``): it imports config, data, models and
evaluation, and is imported by the engines and the workflows.
"""

from medtune.runs.data import RunData, prepare_lock, prepare_run_data, prepare_source
from medtune.runs.folder import FORMAT_VERSION, RunFolder

__all__ = [
    "FORMAT_VERSION",
    "RunData",
    "RunFolder",
    "prepare_lock",
    "prepare_run_data",
    "prepare_source",
]
