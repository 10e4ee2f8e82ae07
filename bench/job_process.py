"""A training job as a user runs it: `jobs/train.py --config examples/configs/digits.yaml` with
`--set` overrides, as a fresh process on a local Ray of its own, timed from its start to its exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Variables a developer's shell may hold that would change what the job does (another cluster, more log lines).
LEFT_OUT_VARIABLES = ("RAY_ADDRESS", "IMGCLS_LOG_LEVEL", "MLFLOW_TRACKING_URI")


def run_training_job(repo: Path, settings: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, the finished process) of the digits config with `settings`; RuntimeError with
    the end of its stderr when it fails."""
    command = [sys.executable, str(repo / "jobs" / "train.py"), "--config", str(repo / "examples/configs/digits.yaml"),
               *[argument for setting in settings for argument in ("--set", setting)]]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key not in LEFT_OUT_VARIABLES}
    environment["PYTHONPATH"] = str(repo)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment, cwd=repo)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    return wall, completed
