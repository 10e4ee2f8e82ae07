"""What a training run must carry across epochs, restarts and resumes, in one object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgcls.config import JobConfig
from imgcls.training.schedules import EarlyStopper, PlateauTracker


@dataclass
class TrainState:
    """Epochs done, the per-epoch history, the plateau and early-stopping trackers, and the best
    epoch's weights (kept only when early stopping restores them). `to_dict` is the JSON part of a
    checkpoint; the best weights are saved beside it as arrays."""

    config: JobConfig
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    plateau: PlateauTracker | None = None
    stopper: EarlyStopper | None = None
    stopped_early: bool = False
    best_weights: list[np.ndarray] | None = None
    # Wall-clock seconds since the epoch (UNIX time) of the first epoch's start and the last epoch's
    # end, and the seconds spent writing checkpoints: where a run's time went (timings.json).
    timings: dict[str, float] = field(default_factory=dict)
    # Multi-label, once finished: the per-class thresholds and the validation metrics at them.
    threshold_metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plateau = self.plateau or PlateauTracker(self.config.train.schedule)
        self.stopper = self.stopper or EarlyStopper(self.config.train.early_stopping)

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.epoch >= self.config.train.epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "plateau": self.plateau.state(),
            "early_stopping": self.stopper.state(),
            "stopped_early": self.stopped_early,
            "timings": self.timings,
            "threshold_metrics": self.threshold_metrics,
        }

    @classmethod
    def from_dict(cls, config: JobConfig, values: dict[str, Any], best_weights: list[np.ndarray] | None = None) -> "TrainState":
        return cls(
            config=config,
            epoch=values["epoch"],
            history=values["history"],
            plateau=PlateauTracker(config.train.schedule, **values["plateau"]),
            stopper=EarlyStopper(config.train.early_stopping, **values["early_stopping"]),
            stopped_early=values.get("stopped_early", False),
            best_weights=best_weights,
            timings=values.get("timings", {}),
            threshold_metrics=values.get("threshold_metrics", {}),
        )

    def record_epoch(self, metrics: dict[str, Any], weights: Callable[[], list[np.ndarray]]) -> None:
        """Add one finished epoch: its history row, the schedule's plateau, the early-stopping rule
        (`weights` is called only when this epoch's weights must be kept as the best)."""
        self.history.append(dict(metrics))
        self.epoch = metrics["epoch"]
        if self.config.train.schedule.name == "reduce_on_plateau":
            self.plateau.update(metrics)
        early = self.config.train.early_stopping
        if early.enabled:
            self.stopped_early = self.stopper.update(self.epoch, metrics)
            if early.restore_best_weights and self.stopper.best_epoch == self.epoch:
                self.best_weights = [np.array(weight) for weight in weights()]
