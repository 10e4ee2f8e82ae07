import math

import pytest

from imgcls.config import EarlyStoppingConfig, ScheduleConfig
from imgcls.training.schedules import EarlyStopper, PlateauTracker, improves, learning_rate_at

STEPS = 10  # steps per epoch
EPOCHS = 20


def rate(step: int, **schedule) -> float:
    return learning_rate_at(ScheduleConfig(**schedule), 0.1, step, STEPS, EPOCHS)


def test_constant():
    assert rate(0) == rate(57) == rate(199) == 0.1


def test_step_decay():
    assert rate(0, name="step", step_epochs=5, step_factor=0.5) == 0.1
    assert rate(49, name="step", step_epochs=5, step_factor=0.5) == 0.1
    assert rate(50, name="step", step_epochs=5, step_factor=0.5) == pytest.approx(0.05)
    assert rate(150, name="step", step_epochs=5, step_factor=0.5) == pytest.approx(0.0125)


def test_cosine_decay_to_the_floor():
    assert rate(0, name="cosine") == pytest.approx(0.1)
    assert rate(100, name="cosine") == pytest.approx(0.05)  # half way
    assert rate(200, name="cosine", min_learning_rate=0.001) == pytest.approx(0.001)
    assert rate(50, name="cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_linear_warmup_then_schedule():
    assert rate(0, warmup_epochs=2) == pytest.approx(0.1 / 20)
    assert rate(9, warmup_epochs=2) == pytest.approx(0.05)
    assert rate(19, warmup_epochs=2) == pytest.approx(0.1)
    assert rate(20, warmup_epochs=2) == pytest.approx(0.1)
    # Cosine runs over the epochs after warm-up: half way at epoch 2 + 9.
    assert rate(110, name="cosine", warmup_epochs=2) == pytest.approx(0.05)


def test_reduce_on_plateau():
    schedule = ScheduleConfig(name="reduce_on_plateau", plateau_patience=2, plateau_factor=0.5, min_learning_rate=0.02)
    tracker = PlateauTracker(schedule)
    scales = [tracker.update({"val_loss": value}) for value in [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.9]]
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]
    assert learning_rate_at(schedule, 0.1, 0, STEPS, EPOCHS, plateau_scale=0.25) == pytest.approx(0.025)
    assert learning_rate_at(schedule, 0.1, 0, STEPS, EPOCHS, plateau_scale=0.125) == pytest.approx(0.02)


def test_early_stopper_counts_patience_and_remembers_the_best():
    stopper = EarlyStopper(EarlyStoppingConfig(enabled=True, monitor="val_accuracy", patience=2, min_delta=0.01))
    decisions = [stopper.update(epoch, {"val_accuracy": value}) for epoch, value in enumerate([0.5, 0.7, 0.705, 0.69], 1)]
    assert decisions == [False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.best == 0.7
    with pytest.raises(ValueError, match="validation metrics"):
        EarlyStopper(EarlyStoppingConfig(monitor="val_loss")).update(1, {"loss": 1.0})


def test_improves_direction():
    assert improves("val_loss", 0.5, 0.6) and not improves("val_loss", 0.6, 0.5)
    assert improves("val_accuracy", 0.6, 0.5) and not improves("accuracy", 0.5, 0.5)
