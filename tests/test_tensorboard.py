"""Live TensorBoard (imgcls.training.tensorboard_sink): events written by rank 0 as each epoch ends,
read back with TensorFlow's own reader; a resumed run writes no step twice; an s3 output_dir gets its
events uploaded after every epoch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import pytest
from conftest import TEST_BUCKET, tiny_job_overrides
from event_files import scalar_steps, scalar_values

from imgcls import train
from imgcls.config import load_job_config
from imgcls.platform import storage
from imgcls.training.tensorboard_sink import TensorBoardSink

TRAIN_SCALARS = {"loss", "accuracy", "learning_rate", "images_per_second"}
VALIDATION_SCALARS = {"loss", "accuracy"}


def epoch(number: int, loss: float | None = None) -> dict:
    loss = 1.0 / number if loss is None else loss
    return {"epoch": number, "loss": loss, "accuracy": 0.5, "val_loss": loss, "val_accuracy": 0.5,
            "learning_rate": 0.001, "images_per_second": 100.0, "epoch_seconds": 1.0, "workers": 1}  # fmt: skip


def test_a_resumed_run_writes_no_step_twice(tmp_path):
    destination = storage.resolve(str(tmp_path / "tensorboard"))
    first = TensorBoardSink(destination, multilabel=False)
    first.start([])
    for number in (1, 2, 3):
        first.epoch_finished(epoch(number))
    first.close()
    # Restarted from the checkpoint after epoch 2: the restored epochs are in the events already, and
    # epoch 3 is trained again (another loss) but was written before the restart.
    second = TensorBoardSink(destination, multilabel=False)
    second.start([epoch(1), epoch(2)])
    second.epoch_finished(epoch(3, loss=0.9))
    second.epoch_finished(epoch(4))
    second.close()
    for split, scalars in (("train", TRAIN_SCALARS), ("validation", VALIDATION_SCALARS)):
        steps = scalar_steps(tmp_path / "tensorboard" / split)
        assert steps == {tag: [1, 2, 3, 4] for tag in scalars}, split
    assert scalar_values(tmp_path / "tensorboard" / "train", "loss")[3] == pytest.approx(1.0 / 3)  # the first one written
    assert len(list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2  # a file per start


def test_restored_epochs_missing_from_the_events_are_written(tmp_path):
    # A rerun that turns train.tensorboard on: the checkpoint's epochs have no events yet.
    sink = TensorBoardSink(storage.resolve(str(tmp_path / "tensorboard")), multilabel=True)
    restored = [{"epoch": number, "loss": 0.5, "micro_f1": 0.7, "exact_match": 0.6, "learning_rate": 0.01,
                 "images_per_second": 10.0} for number in (1, 2)]  # fmt: skip
    sink.start(restored)
    sink.close()
    assert scalar_steps(tmp_path / "tensorboard" / "train") == {
        tag: [1, 2] for tag in ("loss", "micro_f1", "exact_match", "learning_rate", "images_per_second")
    }
    assert scalar_steps(tmp_path / "tensorboard" / "validation") == {}  # no validation split


def test_events_for_an_s3_output_dir_are_uploaded_after_every_epoch(s3_endpoint, tmp_path):
    prefix = "tensorboard-live/tensorboard"
    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def download() -> Path:
        local = tmp_path / f"download-{time.monotonic_ns()}"
        for item in client.list_objects_v2(Bucket=TEST_BUCKET, Prefix=prefix).get("Contents", []):
            path = local / item["Key"][len(prefix) + 1 :]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(TEST_BUCKET, item["Key"], str(path))
        return local

    destination = storage.resolve(f"s3://{TEST_BUCKET}/{prefix}")
    first = TensorBoardSink(destination, multilabel=False)
    first.start([])
    first.epoch_finished(epoch(1))
    assert scalar_steps(download() / "train")["loss"] == [1]  # uploaded before training goes on
    first.epoch_finished(epoch(2))
    first.close()
    second = TensorBoardSink(destination, multilabel=False)
    second.start([epoch(1)])
    second.epoch_finished(epoch(2))
    second.epoch_finished(epoch(3))
    second.close()
    downloaded = download()
    assert scalar_steps(downloaded / "train") == {tag: [1, 2, 3] for tag in TRAIN_SCALARS}
    assert scalar_steps(downloaded / "validation") == {tag: [1, 2, 3] for tag in VALIDATION_SCALARS}


def test_training_writes_events_while_it_runs(ray_session, pattern_dataset, tmp_path):
    import tensorflow as tf

    epochs = 5  # each a second or so on 2 cores, after the workers' start: the run is still going after epoch 1
    config = load_job_config(None, [*tiny_job_overrides(pattern_dataset, tmp_path, epochs=epochs), "train.tensorboard=true"])
    outcome: dict = {}

    def training() -> None:
        try:
            outcome["result"] = train.run(config)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            outcome["error"] = error

    runner = threading.Thread(target=training, daemon=True)
    runner.start()
    train_events = tmp_path / "tensorboard" / "train"
    deadline = time.monotonic() + 300
    while True:
        try:
            if 1 in scalar_steps(train_events).get("loss", []):
                break
        except tf.errors.DataLossError:
            pass  # a record being written
        assert runner.is_alive(), f"training ended without writing epoch 1's events: {outcome}"
        assert time.monotonic() < deadline, "no events for epoch 1"
        time.sleep(0.05)
    # The driver writes history.csv once training has ended: epoch 1's events came before that.
    assert not (tmp_path / "history.csv").exists()
    runner.join(timeout=600)
    assert "result" in outcome, outcome
    every_epoch = list(range(1, epochs + 1))
    assert scalar_steps(train_events) == {tag: every_epoch for tag in TRAIN_SCALARS}
    assert scalar_steps(tmp_path / "tensorboard" / "validation") == {tag: every_epoch for tag in VALIDATION_SCALARS}
    history_loss = {entry["epoch"]: entry["loss"] for entry in outcome["result"].history}
    assert scalar_values(train_events, "loss") == pytest.approx(history_loss)  # float32 in the events
