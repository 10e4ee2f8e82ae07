"""A training job as a person meets it: what its default log says and what `--verbose` adds, which
epochs write checkpoints, and the same model from the same seed twice. Real Ray, real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGE_SIZE, REPO_ROOT, tiny_job_overrides

from imgcls import train
from imgcls.config import load_job_config
from imgcls.training.cadence import MAX_CHECKPOINT_SHARE, should_checkpoint

# What a default run must not print (the list): TensorFlow's native start-up chatter, Ray
# Data progress bars from inside training, Ray Train's per-report dumps, and warnings that are false
# on imgcls's normal path.
NOISE = [
    "cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard", "oneDNN",
    "Running Dataset", "row/s]", "Starting execution of Dataset", "Progress bars disabled",
    "TrainingReport(", "Reporting training result", "Requesting resources", "Started training worker group",
    "will hang unless more CPUs", "PreemptionWatcher", "Token authentication is enabled",
    "INFO:tensorflow", "MultiWorkerMirroredStrategy with cluster_spec",
]  # fmt: skip
EPOCH_LINE = re.compile(r"epoch (\d+)/2 loss [0-9.]+ accuracy [0-9.]+ val_loss [0-9.]+ val_accuracy [0-9.]+ lr ")


def job_command(pattern_dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    settings = [
        f"data.train={pattern_dataset}", f"data.image_size=[{IMAGE_SIZE}, {IMAGE_SIZE}]", "data.channels=3",
        "data.val_fraction=0.25", "train.epochs=2", "train.batch_size=16", f"output_dir={output_dir}",
    ]  # fmt: skip
    return [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config", str(REPO_ROOT / "examples/configs/smoke.yaml"),
            *[argument for setting in settings for argument in ("--set", setting)], *extra]  # fmt: skip


@pytest.fixture(scope="module")
def default_and_verbose_runs(ray_session, pattern_dataset, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """The same job twice through the real CLI on the suite's Ray: with the default log, and --verbose."""
    runs = {}
    environment = {key: value for key, value in os.environ.items() if key != "IMGCLS_LOG_LEVEL"}
    environment["RAY_ADDRESS"] = ray_session
    for mode, extra in (("default", []), ("verbose", ["--verbose"])):
        output_dir = tmp_path_factory.mktemp(f"job_{mode}")
        completed = subprocess.run(job_command(pattern_dataset, output_dir, *extra), env=environment,
                                   capture_output=True, text=True, timeout=600)  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-4000:]
        runs[mode] = (completed.stdout + completed.stderr, output_dir)
    return runs


def test_the_default_log_is_imgcls_lines_and_one_line_per_epoch(default_and_verbose_runs):
    log, _ = default_and_verbose_runs["default"]
    found = [pattern for pattern in NOISE if pattern in log]
    assert not found, f"noise in the default log: {found}\n{log[-4000:]}"
    assert [int(match) for match in EPOCH_LINE.findall(log)] == [1, 2]
    assert "Ray's own logs:" not in log or "/logs" in log
    assert "model artifact" in log and "resource plan:" in log
    # The plan, data, decode, augmentation, training, 2 epochs, artifact, summary, and a few Ray lines
    # that remain (e.g. the PlacementGroupCleaner when several Rays run on one machine) but are no noise.
    assert len([line for line in log.splitlines() if "imgcls" in line or "epoch" in line]) <= 14


def test_verbose_brings_ray_and_tensorflow_lines_back(default_and_verbose_runs):
    log, _ = default_and_verbose_runs["verbose"]
    assert "Reporting training result" in log or "TrainingReport(" in log
    assert "Starting execution of Dataset" in log
    assert [int(match) for match in EPOCH_LINE.findall(log)] == [1, 2]


def artifact_weights(output_dir: Path) -> list[np.ndarray]:
    from imgcls.modeling.artifact import load_artifact

    model, _ = load_artifact(str(output_dir / "model"))
    return model.get_weights()


def test_the_same_seed_gives_bit_identical_weights_and_another_seed_does_not(
    default_and_verbose_runs, pattern_dataset, tmp_path
):
    (_, first), (_, second) = default_and_verbose_runs["default"], default_and_verbose_runs["verbose"]
    same = [np.array_equal(a, b) for a, b in zip(artifact_weights(first), artifact_weights(second))]
    assert same and all(same), "two runs of one config and seed trained different weights"
    history = [json.loads((path / "model" / "metadata.json").read_text())["metrics"]["loss"] for path in (first, second)]
    assert history[0] == history[1]
    config = load_job_config(None, tiny_job_overrides(pattern_dataset, tmp_path, epochs=2) + ["seed=1"])
    other = train.run(config)
    assert not all(np.array_equal(a, b) for a, b in zip(artifact_weights(first), artifact_weights(Path(other.artifact_uri).parent)))


def checkpointed_epochs(output_dir: Path) -> list[int]:
    return sorted(json.loads(path.read_text())["epoch"] for path in (output_dir / "checkpoints" / "train").glob("checkpoint_*/state.json"))


def test_the_default_cadence_checkpoints_a_short_run_once(default_and_verbose_runs):
    # The default, automatic cadence on a run of seconds: no checkpoint cost measured yet and the
    # 60 s interval not reached, so only the last epoch writes one. (checkpoint_every_epochs=2 over
    # five epochs, [2, 4, 5], is the worker-restart scenario of tests/test_fault_tolerance.py.)
    assert checkpointed_epochs(default_and_verbose_runs["default"][1]) == [2]


def test_the_cadence_rule():
    rule = dict(every_epochs=None, interval_s=60.0, epoch_seconds=10.0, seconds_since_checkpoint=5.0)
    assert should_checkpoint(3, finished=True, last_checkpoint_seconds=9.0, **rule)  # the end, always
    assert not should_checkpoint(3, finished=False, last_checkpoint_seconds=None, **rule)  # not measured, not due
    assert should_checkpoint(3, finished=False, last_checkpoint_seconds=10.0 * MAX_CHECKPOINT_SHARE, **rule)
    assert not should_checkpoint(3, finished=False, last_checkpoint_seconds=1.0, **rule)  # 10% of an epoch
    assert should_checkpoint(3, finished=False, last_checkpoint_seconds=1.0, **{**rule, "seconds_since_checkpoint": 60.0})
    every = {**rule, "every_epochs": 3}
    assert [should_checkpoint(epoch, False, last_checkpoint_seconds=0.0, **every) for epoch in range(1, 7)] == [
        False, False, True, False, False, True,
    ]  # fmt: skip
