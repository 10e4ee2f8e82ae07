"""Rank 0's epoch sink for MLflow: each finished epoch's numeric metrics, the epoch as the step. The
requests go out from a background thread, so an epoch never waits on the server; a resumed run logs
only the epochs the server does not have yet. The first failure is one warning, and logging stops."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any

from imgcls.tracking.settings import TrackingTarget

logger = logging.getLogger(__name__)

# The metric whose last step says how far a run's MLflow history goes: every epoch reports it.
STEP_METRIC = "loss"


# Seconds the end of training waits for the epochs still queued (a few requests; the retries are bounded).
CLOSE_TIMEOUT_S = 60


class MlflowEpochSink:
    name = "MLflow epoch metrics"

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.pending: queue.Queue = queue.Queue()  # epochs' metrics, then None at the end
        self.thread: threading.Thread | None = None
        self.last_step = 0  # the last epoch the server holds
        self.logged_epochs = 0
        self.request_seconds = 0.0  # in the background: what the server takes per epoch
        self.failed = False

    def start(self, history: list[dict[str, Any]]) -> None:
        """Start the background thread; it first asks the server how far the run's metrics go, then
        logs the restored epochs beyond that (a resumed run) and each epoch queued after."""
        self.thread = threading.Thread(
            target=self._log_in_background, args=([dict(metrics) for metrics in history],), name="imgcls-mlflow",
            daemon=True,
        )  # fmt: skip
        self.thread.start()

    def epoch_finished(self, metrics: dict[str, Any]) -> None:
        if not self.failed:
            self.pending.put(dict(metrics))  # a copy: the worker adds keys to its own afterwards

    def close(self) -> None:
        """Wait (bounded) for the queued epochs, then say what the logging cost."""
        if self.thread is None:
            return
        self.pending.put(None)
        self.thread.join(timeout=CLOSE_TIMEOUT_S)
        if self.thread.is_alive():
            logger.warning("%s: the last epochs were not logged within %d s (training goes on)", self.name, CLOSE_TIMEOUT_S)
        elif self.logged_epochs:
            logger.info(
                "MLflow: %d epochs logged to run %s in the background, %.1f ms per request", self.logged_epochs,
                self.target.run_id, 1000 * self.request_seconds / self.logged_epochs,
            )  # fmt: skip

    def _log_in_background(self, history: list[dict[str, Any]]) -> None:
        try:
            from imgcls.tracking.server import create_client

            client = create_client(self.target.tracking_uri)
            logged = client.get_metric_history(self.target.run_id, STEP_METRIC)
            self.last_step = max((point.step for point in logged), default=0)
            if self.last_step:
                logger.info("MLflow run %s holds epochs up to %d: logging the later ones", self.target.run_id, self.last_step)
            for metrics in history:
                self._log(client, metrics)
            while (metrics := self.pending.get()) is not None:
                self._log(client, metrics)
        except Exception as error:  # noqa: BLE001 - whatever the server does, training goes on
            self.failed = True
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            logger.warning("%s: stopped after an error (training goes on): %s", self.name, text)

    def _log(self, client, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(metrics["epoch"])
        if step <= self.last_step:
            return
        started = time.perf_counter()
        timestamp = int(time.time() * 1000)
        points = [Metric(key, value, timestamp, step) for key, value in epoch_metric_values(metrics).items()]
        client.log_batch(self.target.run_id, metrics=points, synchronous=True)
        self.last_step = step
        self.logged_epochs += 1
        self.request_seconds += time.perf_counter() - started


def epoch_metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The epoch's numbers as MLflow metrics: no lists (weights_checksums, thresholds), no flags
    (stopped_early), no private keys, and not the epoch itself (it is the step)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "epoch" and not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }  # fmt: skip
