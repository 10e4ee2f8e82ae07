"""Real failures: a Ray Train worker SIGKILLed between two checkpoints, and a training driver
SIGKILLed after its first checkpoint. Both runs must finish with every epoch exactly once in
history.csv, the worker's restart repeating only the epochs since the last checkpoint, and (with
the tracking extra) in one MLflow run with every epoch's metrics once."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO_ROOT
from event_files import scalar_steps
from image_factory import write_pattern_dataset

from imgcls import train
from imgcls.modeling.artifact import load_artifact
from imgcls.config import load_job_config

# Slow enough epochs (a few seconds on 2 cores) that a kill lands inside one.
SLOW_RUN = [
    "data.image_size=[32, 32]",
    "data.val_fraction=0.1",
    "model.name=cnn",
    "model.filters=[16, 32]",
    "train.batch_size=32",
]


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slow") / "train"
    write_pattern_dataset(root, per_class=700, size=32, seed=5)
    return root


def checkpoint_epochs(output_dir: Path) -> list[int]:
    epochs = []
    for state in (output_dir / "checkpoints" / "train").glob("checkpoint_*/state.json"):
        try:
            epochs.append(json.loads(state.read_text())["epoch"])
        except (ValueError, OSError):
            pass  # still being written
    return sorted(epochs)


def wait_for_checkpoint(output_dir: Path, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while epoch not in checkpoint_epochs(output_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint for epoch {epoch} in {output_dir}")
        time.sleep(0.05)


def wait_for_snapshot(output_dir: Path, timeout: float = 120) -> None:
    """Ray Train records a reported checkpoint in its run snapshot just after the worker wrote it;
    only a recorded checkpoint can be resumed from by a new driver."""
    run = output_dir / "checkpoints" / "train"
    deadline = time.monotonic() + timeout
    while True:
        snapshot = run / "checkpoint_manager_snapshot.json"
        names = [path.parent.name for path in run.glob("checkpoint_*/state.json")]
        if snapshot.exists() and any(name in snapshot.read_text() for name in names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray Train recorded no checkpoint in {snapshot}")
        time.sleep(0.05)


def history_epochs(output_dir: Path) -> list[int]:
    with open(output_dir / "history.csv") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def tracking_settings(mlflow_uri: str | None, experiment: str) -> list[str]:
    return [f"tracking.mlflow_uri={mlflow_uri}", f"tracking.experiment={experiment}"] if mlflow_uri else []


def assert_one_mlflow_run_with_each_epoch_once(mlflow_uri: str | None, experiment: str, output_dir: Path,
                                               epochs: int) -> None:  # fmt: skip
    """The run the training started (its tracking.json) is the experiment's only run, FINISHED, with
    steps 1..epochs of each per-epoch metric exactly once, however often its driver or workers restarted."""
    if mlflow_uri is None:
        return
    from mlflow_server import PER_EPOCH_METRICS, metric_steps, mlflow_client, recorded_run_id

    client = mlflow_client(mlflow_uri)
    run_id = recorded_run_id(output_dir)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [run_id]
    for key in PER_EPOCH_METRICS:
        assert metric_steps(client, run_id, key) == list(range(1, epochs + 1)), key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["model_version"]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []


def test_killed_worker_restarts_from_the_last_checkpoint(ray_session, mlflow_server_if_installed, slow_dataset, tmp_path):
    experiment = f"worker-restart-{tmp_path.name}"
    config = load_job_config(
        None,
        [f"data.train={slow_dataset}", f"output_dir={tmp_path}", "train.epochs=5", "train.max_failures=2",
         "train.checkpoint_every_epochs=2", "train.tensorboard=true", *SLOW_RUN,
         *tracking_settings(mlflow_server_if_installed, experiment)],
    )  # fmt: skip
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train.run(config)), daemon=True)
    runner.start()
    wait_for_checkpoint(tmp_path, 2)
    wait_for_snapshot(tmp_path)  # uploaded in the background: recorded by Ray Train only a moment later
    # This session's Ray was started by this process: its workers are our descendants (another
    # Ray on the machine, a parallel test process's, has workers of its own).
    workers = [
        process for process in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(process))
    ]
    assert len(workers) == 1
    assert checkpoint_epochs(tmp_path) == [2]  # epoch 3 is under way; no checkpoint after epoch 1 or 3
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(timeout=600)
    assert "result" in outcome, "training did not finish after the worker was killed"
    assert history_epochs(tmp_path) == [1, 2, 3, 4, 5]
    assert [entry["epoch"] for entry in outcome["result"].history] == [1, 2, 3, 4, 5]
    # The restart began after epoch 2 and repeated only 3; every second epoch checkpoints, and the last.
    assert checkpoint_epochs(tmp_path) == [2, 4, 5]
    # Each epoch once in TensorBoard too: the restart's file skips the steps the first one holds.
    assert scalar_steps(tmp_path / "tensorboard" / "train")["loss"] == [1, 2, 3, 4, 5]
    # And in MLflow: rank 0's restarted sink logs only the epochs the run does not hold yet.
    assert_one_mlflow_run_with_each_epoch_once(mlflow_server_if_installed, experiment, tmp_path, 5)
    assert (tmp_path / "model" / "model.keras").is_file()
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_after_the_driver_died_resumes(ray_session, mlflow_server_if_installed, slow_dataset, tmp_path):
    experiment = f"driver-rerun-{tmp_path.name}"
    settings = [f"data.train={slow_dataset}", f"output_dir={tmp_path}", "train.epochs=3", "data.channels=3",
                "train.checkpoint_every_epochs=1", *SLOW_RUN, *tracking_settings(mlflow_server_if_installed, experiment)]  # fmt: skip
    command = [
        sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config", str(REPO_ROOT / "examples/configs/smoke.yaml"),
    ] + [argument for setting in settings for argument in ("--set", setting)]  # fmt: skip
    environment = {**os.environ, "RAY_ADDRESS": ray_session}
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(tmp_path, 1)
        wait_for_snapshot(tmp_path)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert not (tmp_path / "model").exists()
    assert checkpoint_epochs(tmp_path)[-1] < 3
    second = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    output = second.stdout + second.stderr
    assert "resuming from the latest" in output
    assert "resuming from the checkpoint after epoch" in output, output[-6000:]
    assert history_epochs(tmp_path) == [1, 2, 3]
    assert (tmp_path / "model" / "metadata.json").is_file()
    # The rerun continued the MLflow run the killed driver started, without a step twice.
    if mlflow_server_if_installed:
        assert "resumed run" in output
    assert_one_mlflow_run_with_each_epoch_once(mlflow_server_if_installed, experiment, tmp_path, 3)


def test_early_stopping_stops_and_restores_the_best_weights(ray_session, pattern_dataset, tmp_path):
    config = load_job_config(
        None,
        [
            f"data.train={pattern_dataset}", f"output_dir={tmp_path}", "data.image_size=[16, 16]",
            "data.val_fraction=0.25", "train.epochs=8", "train.batch_size=16",
            # No later epoch can beat the first by a whole 1.0 of accuracy: stop after `patience` more.
            "train.checkpoint_every_epochs=1",
            "train.early_stopping.enabled=true", "train.early_stopping.monitor=val_accuracy",
            "train.early_stopping.min_delta=1.0", "train.early_stopping.patience=2",
        ],
    )  # fmt: skip
    result = train.run(config)
    assert [entry["epoch"] for entry in result.history] == [1, 2, 3]
    assert result.metrics["stopped_early"] is True and result.metrics["restored_epoch"] == 1
    first_checkpoint = next(
        path.parent for path in (tmp_path / "checkpoints" / "train").glob("checkpoint_*/state.json")
        if json.loads(path.read_text())["epoch"] == 1
    )  # fmt: skip
    import keras

    epoch_one = keras.saving.load_model(first_checkpoint / "model.keras", compile=False, safe_mode=True)
    final, _ = load_artifact(result.artifact_uri)
    for expected, actual in zip(epoch_one.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(expected, actual)
