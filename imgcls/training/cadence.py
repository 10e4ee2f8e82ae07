"""When a training worker writes a checkpoint: the decision after each epoch, as one pure function."""

from __future__ import annotations

# Automatic cadence: checkpoint every epoch while a checkpoint costs at most this share of an epoch.
MAX_CHECKPOINT_SHARE = 0.05


def should_checkpoint(
    epoch: int,
    finished: bool,
    every_epochs: int | None,
    interval_s: float,
    last_checkpoint_seconds: float | None,
    epoch_seconds: float,
    seconds_since_checkpoint: float,
) -> bool:
    """After `epoch` (1-based): always when training has finished (the last epoch, or early stopping);
    with `every_epochs`, every that many epochs; otherwise when the last measured checkpoint cost at
    most MAX_CHECKPOINT_SHARE of this epoch's time, or `interval_s` have passed since the last one."""
    if finished:
        return True
    if every_epochs is not None:
        return epoch % every_epochs == 0
    cheap = last_checkpoint_seconds is not None and last_checkpoint_seconds <= MAX_CHECKPOINT_SHARE * epoch_seconds
    return cheap or seconds_since_checkpoint >= interval_s
