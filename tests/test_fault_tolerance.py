"""Real failures: a Ray Train worker SIGKILLed between two checkpoints, and a training driver
SIGKILLed after its first checkpoint. Both runs must finish with every epoch exactly once in
history.csv, the worker's restart repeating only the epochs since the last checkpoint."""

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


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []


def test_killed_worker_restarts_from_the_last_checkpoint(ray_session, slow_dataset, tmp_path):
    config = load_job_config(
        None,
        [f"data.train={slow_dataset}", f"output_dir={tmp_path}", "train.epochs=4", "train.max_failures=2",
         "train.checkpoint_every_epochs=2", "train.tensorboard=true", *SLOW_RUN],
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
    assert history_epochs(tmp_path) == [1, 2, 3, 4]
    assert [entry["epoch"] for entry in outcome["result"].history] == [1, 2, 3, 4]
    assert checkpoint_epochs(tmp_path) == [2, 4]  # the restart began after epoch 2 and repeated only 3
    # Each epoch once in TensorBoard too: the restart's file skips the steps the first one holds.
    assert scalar_steps(tmp_path / "tensorboard" / "train")["loss"] == [1, 2, 3, 4]
    assert (tmp_path / "model" / "model.keras").is_file()
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_after_the_driver_died_resumes(ray_session, slow_dataset, tmp_path):
    command = [
        sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config", str(REPO_ROOT / "examples/configs/smoke.yaml"),
        "--set", f"data.train={slow_dataset}", "--set", f"output_dir={tmp_path}", "--set", "train.epochs=3",
        "--set", "data.channels=3", "--set", "train.checkpoint_every_epochs=1",
    ] + [argument for setting in SLOW_RUN for argument in ("--set", setting)]  # fmt: skip
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
