"""What MLflow tracking costs a training, the way a user meets it: the digits example
(examples/configs/digits.yaml) trained by `jobs/train.py` as a fresh process with tracking off and
with tracking on against a real MLflow server (started here on 127.0.0.1, sqlite backend, artifacts
served from a local folder), in alternating order, in the same run.

Reports per contender the whole-process time, the median epoch time (epochs 2..N, history.csv), and
for tracking on the background request time per epoch that rank 0's MLflow sink logged; then the
ratios on/off. Target: epochs at most 2% slower with tracking on.

Usage: python bench/tracking_overhead.py [--rounds 3] [--epochs 15] [--data examples/data/digits/train]
Results: bench/results/tracking_overhead.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from job_process import run_training_job  # noqa: E402

REQUEST_LINE = re.compile(r"MLflow: (\d+) epochs logged to run \S+ in the background, ([\d.]+) ms per request")


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(root / "mlflow.log", "w"), stderr=subprocess.STDOUT, env=environment, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow server did not start: {(root / 'mlflow.log').read_text()[-2000:]}")


def training(data: Path, output: Path, epochs: int, tracking_uri: str | None) -> dict:
    settings = [f"data.train={data}", f"train.epochs={epochs}", f"output_dir={output}"]
    if tracking_uri:
        settings += [f"tracking.mlflow_uri={tracking_uri}", "tracking.experiment=bench-tracking"]
    wall, completed = run_training_job(REPO, settings)
    with open(output / "history.csv") as handle:
        epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
    result = {"wall_s": round(wall, 2), "median_epoch_s": statistics.median(epoch_seconds[1:]),
              "epochs": len(epoch_seconds)}  # fmt: skip
    logged = REQUEST_LINE.search(completed.stdout + completed.stderr)
    if tracking_uri:
        if logged is None:
            raise RuntimeError("tracking on, but no 'MLflow: N epochs logged' line in the job's log")
        result.update(epochs_logged=int(logged.group(1)), background_ms_per_epoch=float(logged.group(2)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="examples/data/digits/train")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    arguments = parser.parse_args()
    data = Path(arguments.data).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="imgcls-bench-tracking-"))
    server, uri = start_server(scratch)
    rounds = []
    try:
        for number in range(arguments.rounds):
            contenders = [("off", None), ("on", uri)] if number % 2 == 0 else [("on", uri), ("off", None)]
            row = {name: training(data, scratch / f"{name}{number}", arguments.epochs, target) for name, target in contenders}
            row["whole_process_ratio"] = row["on"]["wall_s"] / row["off"]["wall_s"]
            row["epoch_ratio"] = row["on"]["median_epoch_s"] / row["off"]["median_epoch_s"]
            rounds.append(row)
            print(f"round {number + 1}: off {row['off']['wall_s']:.1f} s ({row['off']['median_epoch_s']:.3f} s/epoch), "
                  f"on {row['on']['wall_s']:.1f} s ({row['on']['median_epoch_s']:.3f} s/epoch, "
                  f"{row['on']['background_ms_per_epoch']:.1f} ms of requests per epoch in the background): "
                  f"whole process {row['whole_process_ratio']:.3f}x, epochs {row['epoch_ratio']:.3f}x", flush=True)  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "config": "examples/configs/digits.yaml", "epochs": arguments.epochs, "rounds": rounds,
        "median_whole_process_ratio": statistics.median(row["whole_process_ratio"] for row in rounds),
        "median_epoch_ratio": statistics.median(row["epoch_ratio"] for row in rounds),
        "median_whole_process_seconds_added": statistics.median(row["on"]["wall_s"] - row["off"]["wall_s"] for row in rounds),
        "median_background_ms_per_epoch": statistics.median(row["on"]["background_ms_per_epoch"] for row in rounds),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracking_overhead.json").write_text(json.dumps(summary, indent=2))
    print(f"median: whole process {summary['median_whole_process_ratio']:.3f}x "
          f"({summary['median_whole_process_seconds_added']:+.1f} s), epochs {summary['median_epoch_ratio']:.3f}x, "
          f"{summary['median_background_ms_per_epoch']:.1f} ms of requests per epoch -> "
          f"{RESULTS / 'tracking_overhead.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
