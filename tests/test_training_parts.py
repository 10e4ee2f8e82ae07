"""The training worker's parts, run in this process on a tiny real model, with no Ray: one train and
one eval step, checkpoint save and restore (bit-exact, optimizer state included), the fine-tuning
phase plan, and the training state's round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from imgcls.config import load_job_config
from imgcls.training.finetune import PhasePlan
from imgcls.training.state import TrainState


def tiny_config(*overrides: str):
    return load_job_config(None, ["data.train=/data", "data.image_size=[8, 8]", "train.batch_size=4", *overrides])


def tiny_parts(config, num_classes: int = 3):
    """A real model, optimizer and steps for 8x8 RGB images under the default (one-device) strategy."""
    import keras
    import tensorflow as tf

    from imgcls.modeling.losses import create_loss
    from imgcls.modeling.models import create_model, create_optimizer
    from imgcls.training.steps import build_steps

    keras.utils.set_random_seed(config.seed)
    strategy = tf.distribute.get_strategy()
    model = create_model(config.model, tuple(config.data.image_size), config.data.channels, num_classes)
    optimizer = create_optimizer(config.train.optimizer, config.train.learning_rate)
    optimizer.build(model.trainable_variables)
    loss = create_loss(num_classes)
    return model, optimizer, build_steps(strategy, model, optimizer, loss, num_classes), loss


def batch(seed: int = 0, size: int = 4, num_classes: int = 3):
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(size, 8, 8, 3)).astype(np.uint8)
    labels = generator.integers(0, num_classes, size=size).astype(np.int32)
    return images, labels


def test_one_train_step_and_one_eval_step_return_the_batch_sums():
    config = tiny_config()
    model, _, steps, loss = tiny_parts(config)
    images, labels = batch()
    before = [weight.copy() for weight in model.get_weights()]
    expected_loss = float(np.sum(loss(labels, model(images.astype(np.float32), training=False)).numpy()))
    loss_sum, correct, count = steps.eval(images, labels)
    assert count == 4 and loss_sum == pytest.approx(expected_loss, rel=1e-5)
    predicted = np.argmax(model(images.astype(np.float32), training=False).numpy(), axis=1)
    assert correct == np.sum(predicted == labels)
    assert [np.array_equal(a, b) for a, b in zip(before, model.get_weights())] == [True] * len(before)
    loss_sum, correct, count = steps.train(images, labels)
    assert count == 4 and loss_sum == pytest.approx(expected_loss, rel=1e-5)  # the loss before this update
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert steps.sum_across_workers(np.array([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]
    assert steps.gather_across_workers([5.0]).tolist() == [5.0]


def test_the_steps_run_under_multi_worker_mirrored_strategy_in_one_plain_process():
    # The strategy must be made before TensorFlow runs any op, so this needs a fresh process.
    script = """
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from imgcls.config import load_job_config
from imgcls.modeling.losses import create_loss
from imgcls.modeling.models import create_model, create_optimizer
from imgcls.training.steps import build_steps
config = load_job_config(None, ["data.train=/d", "data.image_size=[8, 8]"])
with strategy.scope():
    model = create_model(config.model, (8, 8), 3, 2)
    optimizer = create_optimizer("adam", 1e-3)
    optimizer.build(model.trainable_variables)
steps = build_steps(strategy, model, optimizer, create_loss(2), 2)
images = np.zeros((4, 8, 8, 3), np.uint8); labels = np.array([0, 1, 0, 1], np.int32)
first = steps.train(images, labels); second = steps.eval(images, labels)
print("sums", first[2], second[2], steps.sum_across_workers(first)[2], strategy.num_replicas_in_sync)
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "sums 4.0 4.0 4.0 1" in finished.stdout


def test_checkpoint_save_and_restore_are_bit_exact_with_the_optimizer_state(tmp_path):
    from imgcls.training.checkpoint import load_final_model, restore_checkpoint, save_checkpoint

    config = tiny_config("train.early_stopping.enabled=true", "train.early_stopping.monitor=loss")
    model, optimizer, steps, _ = tiny_parts(config)
    for seed in range(3):
        steps.train(*batch(seed))
    state = TrainState(config)
    state.record_epoch({"epoch": 1, "loss": 0.7, "accuracy": 0.5}, model.get_weights)
    assert state.best_weights is not None
    save_checkpoint(tmp_path, model, optimizer, state)
    # A fresh replica, initialised differently, takes everything back.
    fresh_model, fresh_optimizer, fresh_steps, _ = tiny_parts(config.model_copy(update={"seed": 7}))
    restored = restore_checkpoint(tmp_path, fresh_model, fresh_optimizer, config)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), fresh_model.get_weights()))
    assert len(optimizer.variables) == len(fresh_optimizer.variables) > 2
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(optimizer.variables, fresh_optimizer.variables))
    assert all(np.array_equal(a, b) for a, b in zip(state.best_weights, restored.best_weights))
    assert restored.to_dict() == state.to_dict()
    # Both continue identically from there.
    images, labels = batch(9)
    assert np.array_equal(steps.train(images, labels), fresh_steps.train(images, labels))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), fresh_model.get_weights()))
    final_model, final_state = load_final_model(tmp_path)
    assert final_state["epoch"] == 1 and final_model.output_shape == model.output_shape


def test_train_state_round_trips_through_json_and_tracks_the_rules():
    config = tiny_config(
        "train.schedule.name=reduce_on_plateau", "train.schedule.plateau_patience=1", "train.schedule.monitor=loss",
        "train.early_stopping.enabled=true", "train.early_stopping.monitor=loss", "train.early_stopping.patience=1",
    )  # fmt: skip
    state = TrainState(config)
    weights_taken = []

    def weights():
        weights_taken.append(True)
        return [np.full(2, len(weights_taken), np.float32)]

    state.record_epoch({"epoch": 1, "loss": 0.5}, weights)
    state.record_epoch({"epoch": 2, "loss": 0.6}, weights)  # worse: the plateau halves the rate, patience runs out
    assert len(weights_taken) == 1, "weights are copied only for a new best epoch"
    assert state.stopped_early and state.finished and state.stopper.best_epoch == 1
    assert state.plateau.scale == pytest.approx(config.train.schedule.plateau_factor)
    again = TrainState.from_dict(config, json.loads(json.dumps(state.to_dict())), state.best_weights)
    assert again.to_dict() == state.to_dict() and again.epoch == 2 and again.finished
    assert again.plateau.scale == state.plateau.scale and again.stopper.best == state.stopper.best
    assert not TrainState(config).finished and TrainState(config, epoch=config.train.epochs).finished


def test_the_phase_plan_of_a_pretrained_backbone_and_of_a_plain_model():
    backbone = tiny_config("model.name=MobileNetV3Small", "data.image_size=[32, 32]", "finetune.freeze_epochs=2",
                           "train.learning_rate=0.01")  # fmt: skip
    plan = PhasePlan(backbone)
    assert [plan.frozen_at(epoch) for epoch in range(4)] == [True, True, False, False]
    assert [plan.base_learning_rate_at(epoch) for epoch in (1, 2)] == [0.01, pytest.approx(0.001)]
    explicit = PhasePlan(backbone.model_copy(update={"finetune": backbone.finetune.model_copy(update={"learning_rate": 0.003})}))
    assert explicit.base_learning_rate_at(3) == 0.003
    feature_extraction = PhasePlan(tiny_config("model.name=MobileNetV3Small", "data.image_size=[32, 32]"))
    assert all(feature_extraction.frozen_at(epoch) for epoch in range(5))
    plain = PhasePlan(tiny_config("train.learning_rate=0.02"))
    assert not plain.fine_tuning and not plain.frozen_at(0) and plain.base_learning_rate_at(9) == 0.02
    assert plain.enter(model=None, epoch=0, log=False) is False


def test_entering_a_phase_changes_the_trainable_layers_once():
    from imgcls.modeling.models import create_model

    config = tiny_config("model.name=MobileNetV3Small", "model.weights=none", "model.init_from=/nowhere",
                         "data.image_size=[32, 32]", "finetune.freeze_epochs=1", "finetune.unfreeze_layers=5")  # fmt: skip
    model = create_model(config.model, (32, 32), 3, 2)
    plan = PhasePlan(config)
    plan.prepare_for_optimizer(model)
    assert plan.enter(model, 0, log=False) is True
    frozen_trainable = len(model.trainable_variables)
    assert plan.enter(model, 0, log=False) is False  # same phase: nothing to retrace
    assert plan.enter(model, 1, log=False) is True
    assert len(model.trainable_variables) > frozen_trainable


def test_the_epoch_seed_is_one_formula_for_block_order_and_shuffles():
    from imgcls.training.feed import epoch_seed

    assert epoch_seed(3, 2, 1) == 3021
    assert len({epoch_seed(0, epoch, rank) for epoch in range(10) for rank in range(8)}) == 80


def test_fewer_workers_keep_the_global_batch():
    from imgcls.train import per_worker_batch

    assert [per_worker_batch(16, 2, workers) for workers in (2, 1)] == [16, 32]
    assert per_worker_batch(16, 4, 3) * 3 in range(64, 64 + 3)  # rounded up by at most workers - 1


def test_the_schedule_deadline_fails_a_run_that_waits_too_long_and_only_then():
    """Ray Train's own controller states, driven by hand: waiting (restarting, an unchanged elastic
    no-op decision, scheduling) counts toward the bound; a running group resets it."""
    import time

    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState, SchedulingState

    from imgcls.training.scheduling import ScheduleDeadline, WorkersNotScheduled, find_not_scheduled

    deadline = ScheduleDeadline(timeout_s=1.5)  # far above a pause of this busy machine
    restarting = RestartingState(training_failed_error=None)
    deadline.after_controller_state_update(RunningState(), restarting)
    deadline.after_controller_state_update(restarting, restarting)  # a no-op decision: paced, still waiting
    running = RunningState()
    deadline.after_controller_state_update(SchedulingState(scaling_decision=None), running)
    time.sleep(1.7)
    deadline.after_controller_state_update(running, running)  # running for any time is no wait
    deadline.after_controller_state_update(running, restarting)
    time.sleep(1.7)
    with pytest.raises(WorkersNotScheduled) as raised:
        deadline.after_controller_state_update(restarting, SchedulingState(scaling_decision=None))
    from ray.train.v2.api.exceptions import ControllerError

    assert find_not_scheduled(ControllerError(raised.value)) is raised.value
    assert find_not_scheduled(ControllerError(RuntimeError("other"))) is None
