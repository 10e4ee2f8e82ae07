"""Learning-rate schedules, plateau tracking and early stopping: plain Python, the same on every worker.

Every worker sees the same all-reduced metrics, so every worker reaches the same decision.
"""

from __future__ import annotations

import math

from imgcls.config import EarlyStoppingConfig, ScheduleConfig, metric_mode


def improves(monitor: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Losses improve downwards, everything else (accuracy) upwards."""
    if best is None:
        return True
    if metric_mode(monitor) == "min":
        return value < best - min_delta
    return value > best + min_delta


def learning_rate_at(
    schedule: ScheduleConfig, base_rate: float, step: int, steps_per_epoch: int, total_epochs: int, plateau_scale: float = 1.0
) -> float:
    """The learning rate for global step `step` (0-based)."""
    epoch_position = step / steps_per_epoch  # fractional epochs done
    warmup = schedule.warmup_epochs
    if warmup and epoch_position < warmup:
        return base_rate * (step + 1) / (warmup * steps_per_epoch)
    if schedule.name == "step":
        return base_rate * schedule.step_factor ** int(epoch_position // schedule.step_epochs)
    if schedule.name == "cosine":
        span = max(total_epochs - warmup, 1e-9)
        progress = min(max((epoch_position - warmup) / span, 0.0), 1.0)
        floor = schedule.min_learning_rate
        return floor + (base_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.name == "reduce_on_plateau":
        return max(base_rate * plateau_scale, schedule.min_learning_rate)
    return base_rate


class PlateauTracker:
    """reduce_on_plateau: multiply the scale by `plateau_factor` after `plateau_patience` flat epochs."""

    def __init__(self, schedule: ScheduleConfig, scale: float = 1.0, best: float | None = None, waited: int = 0):
        self.schedule, self.scale, self.best, self.waited = schedule, scale, best, waited

    def update(self, metrics: dict[str, float]) -> float:
        value = metrics.get(self.schedule.monitor)
        if value is None:
            return self.scale
        if improves(self.schedule.monitor, value, self.best):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
            if self.waited >= self.schedule.plateau_patience:
                self.scale *= self.schedule.plateau_factor
                self.waited = 0
        return self.scale

    def state(self) -> dict:
        return {"scale": self.scale, "best": self.best, "waited": self.waited}


class EarlyStopper:
    """Tracks the monitored metric; says when to stop and which epoch was best."""

    def __init__(self, config: EarlyStoppingConfig, best: float | None = None, best_epoch: int = 0, waited: int = 0):
        self.config, self.best, self.best_epoch, self.waited = config, best, best_epoch, waited

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record epoch `epoch` (1-based); True when training should stop after it."""
        value = metrics.get(self.config.monitor)
        if value is None:
            raise ValueError(
                f"train.early_stopping.monitor is '{self.config.monitor}' but the epoch reported only "
                f"{sorted(metrics)}; validation metrics need data.val or data.val_fraction > 0"
            )
        if improves(self.config.monitor, value, self.best, self.config.min_delta):
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return False
        self.waited += 1
        return self.waited >= self.config.patience

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited}
