"""The job entrypoints' exit codes and messages (no Ray needed: they fail before starting it)."""

import subprocess
import sys

from conftest import REPO_ROOT


def run_job(name: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / f"{name}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_config_key_exits_2_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  train: /x\ntrain:\n  epochz: 3\n")
    completed = run_job("train", "--config", str(config))
    assert completed.returncode == 2
    assert "unknown key 'train.epochz'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_missing_config_file_exits_2(tmp_path):
    completed = run_job("train", "--config", str(tmp_path / "nope.yaml"))
    assert completed.returncode == 2 and "Cannot read config file" in completed.stderr


def test_predict_with_missing_artifact_exits_2(tmp_path):
    completed = run_job("predict", "--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert completed.returncode == 2
    assert "No model artifact" in completed.stderr and "Traceback" not in completed.stderr


def test_predict_bad_override_exits_2(tmp_path):
    completed = run_job(
        "predict", "--model", "m", "--input", str(tmp_path), "--output", "o", "--set", "batch_size=-1"
    )
    assert completed.returncode == 2 and "'batch_size'" in completed.stderr


def test_usage_errors_exit_2():
    assert run_job("train").returncode == 2
