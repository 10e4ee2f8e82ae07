"""Rank 0's epoch sink for MLflow: each finished epoch's numeric metrics, the epoch as the step, one
request per epoch. A resumed run logs only the epochs the server does not have yet."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from imgcls.tracking.settings import TrackingTarget

logger = logging.getLogger(__name__)

# The metric whose last step says how far a run's MLflow history goes: every epoch reports it.
STEP_METRIC = "loss"


class MlflowEpochSink:
    name = "MLflow epoch metrics"

    def __init__(self, target: TrackingTarget) -> None:
        self.target = target
        self.client = None
        self.last_step = 0  # the last epoch the server holds
        self.logged_epochs = 0
        self.logging_seconds = 0.0  # spent in the per-epoch requests: the overhead tracking adds to an epoch
        self.start_seconds = 0.0  # MLflow's import and the first request, once before the first epoch

    def start(self, history: list[dict[str, Any]]) -> None:
        """Ask the server how far the run's metrics go, then log the restored epochs beyond that
        (ones logged before the server was reachable again, or before this run was resumed)."""
        from imgcls.tracking.server import create_client

        started = time.perf_counter()
        self.client = create_client(self.target.tracking_uri)
        logged = self.client.get_metric_history(self.target.run_id, STEP_METRIC)
        self.last_step = max((point.step for point in logged), default=0)
        self.start_seconds = time.perf_counter() - started
        if self.last_step:
            logger.info("MLflow run %s holds epochs up to %d: logging the later ones", self.target.run_id, self.last_step)
        for metrics in history:
            self.epoch_finished(metrics)

    def epoch_finished(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(metrics["epoch"])
        if step <= self.last_step:
            return
        started = time.perf_counter()
        timestamp = int(time.time() * 1000)
        points = [Metric(key, value, timestamp, step) for key, value in epoch_metric_values(metrics).items()]
        self.client.log_batch(self.target.run_id, metrics=points, synchronous=True)
        self.last_step = step
        self.logged_epochs += 1
        self.logging_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Nothing to flush (every epoch was logged synchronously): say what the logging cost."""
        if self.logged_epochs:
            logger.info(
                "MLflow: %d epochs logged to run %s, %.1f ms per epoch (%.2f s to start)", self.logged_epochs,
                self.target.run_id, 1000 * self.logging_seconds / self.logged_epochs, self.start_seconds,
            )  # fmt: skip


def epoch_metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The epoch's numbers as MLflow metrics: no lists (weights_checksums, thresholds), no flags
    (stopped_early), no private keys, and not the epoch itself (it is the step)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "epoch" and not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }  # fmt: skip
