"""Where rank 0 sends each finished epoch's metrics as it happens, besides its log line: TensorBoard
event files, an experiment tracker. A sink that fails says so once and is dropped: what watches
training never stops it."""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class EpochSink(Protocol):
    name: str

    def start(self, history: list[dict[str, Any]]) -> None:
        """Called once before the first epoch this worker runs, with the epochs a restored checkpoint
        already holds (a resumed run: the sink skips what it already has)."""

    def epoch_finished(self, metrics: dict[str, Any]) -> None:
        """One finished epoch (its metrics as in history.csv, `epoch` counting from 1)."""

    def close(self) -> None:
        """Training ended on this worker."""


def build_sinks(plan, rank: int) -> list[EpochSink]:
    """Rank 0's sinks for this run (none on other ranks). Each is imported only when the run uses it."""
    if rank != 0:
        return []
    sinks: list[EpochSink] = []
    if plan.tensorboard_uri:  # the driver sets it when train.tensorboard is on
        from imgcls.platform import storage
        from imgcls.training.tensorboard_sink import TensorBoardSink

        destination = storage.resolve(plan.tensorboard_uri, plan.config.storage.endpoint_url)
        sinks.append(TensorBoardSink(destination, plan.multilabel))
    if plan.tracking is not None:
        from imgcls.tracking.epoch_sink import MlflowEpochSink

        sinks.append(MlflowEpochSink(plan.tracking))
    return sinks


class EpochSinks:
    """The sinks of one worker, each guarded: its first failure is logged and the sink dropped."""

    def __init__(self, sinks: list[EpochSink]) -> None:
        self.sinks = list(sinks)

    def _each(self, action: str, *arguments) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, action)(*arguments)
            except Exception as error:  # noqa: BLE001 - whatever a sink hits, training goes on
                logger.warning("%s: stopped after an error (training goes on): %s", sink.name, str(error).splitlines()[0][:300] if str(error) else type(error).__name__)
                self.sinks.remove(sink)

    def start(self, history: list[dict[str, Any]]) -> None:
        self._each("start", history)

    def epoch_finished(self, metrics: dict[str, Any]) -> None:
        self._each("epoch_finished", metrics)

    def close(self) -> None:
        self._each("close")
