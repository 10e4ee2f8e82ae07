"""A real MLflow tracking server for the tests: `mlflow server` on 127.0.0.1 with a sqlite backend,
serving artifacts from a local folder (clients upload them over HTTP, as to a team's server); and
what the tests read back from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port

# Seconds the server may take to create its database and answer /health: about 10 s on a quiet 2-core
# machine, over a minute beside the suite's other processes (it imports the server twice). A server
# still silent then is started once more, on another port.
START_TIMEOUT_S = 150
START_ATTEMPTS = 2


# Metrics every epoch of a run with validation reports.
PER_EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second", "epoch_seconds")


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def recorded_run_id(output_dir: Path) -> str:
    """The MLflow run a training in `output_dir` logs to (its tracking.json)."""
    return json.loads((output_dir / "tracking.json").read_text())["run_id"]


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, key))


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log_path: Path

    def kill(self) -> None:
        """SIGKILL the server and its uvicorn worker (its own process group): gone, nothing flushed."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_mlflow_server(root: Path) -> MlflowServer:
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start(root / f"attempt-{attempt}")
        except RuntimeError:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start(root: Path) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # The server's job runner (a huey consumer beside uvicorn) serves nothing the tests use.
    environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = root / "mlflow.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
        )  # fmt: skip
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"{server.uri}/health", timeout=2)
            return server
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                server.kill()
                raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.25)
