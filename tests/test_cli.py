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


def test_a_jobs_api_address_never_joins_another_cluster(ray_session, pattern_dataset, tmp_path):
    """RAY_ADDRESS=http://... means "the cluster serving that Jobs API on this machine". The suite's
    own Ray is the one found here, on another port: the job must refuse it, not run on it."""
    import os

    from conftest import free_port

    model = tmp_path / "no-model-needed"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config", "/dev/null",
         "--set", f"data.train={pattern_dataset}", "--set", f"output_dir={model}"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "is the Jobs API of a cluster" in completed.stderr and "Traceback" not in completed.stderr
