"""End to end through the real CLI: a `ray start --head` cluster on loopback and `ray job submit`."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, free_port

VENV_BIN = Path(sys.executable).parent


def stop_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes. `ray stop` would also kill the suite's own Ray, and with
    it the pytest process that is that cluster's driver."""
    import psutil

    members = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in argument for argument in process.info["cmdline"] or []):
                members.append(process)
                members.extend(process.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in members:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(members, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A single-node Ray started as a user would, bound to 127.0.0.1, with its own temp dir."""
    # Unix socket paths must stay short, so the temp dir lives directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="imgcls-ray-", dir="/tmp")
    base_dir = tmp_path_factory.mktemp("job_base")
    dashboard_port, gcs_port = free_port(), free_port()
    # Token authentication on, with a token of our own, so the test does not depend on ~/.ray.
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    environment = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "IMGCLS_BASE_DIR": str(base_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
    }
    environment.pop("RAY_ADDRESS", None)
    start = [
        str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", "2",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    # The suite's own Ray already holds the default agent and metrics ports: pick free ones.
    for option in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
    ):  # fmt: skip
        start += [option, str(free_port())]
    subprocess.run(start, env=environment, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield address, f"127.0.0.1:{gcs_port}", environment, base_dir
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_status(address: str, environment: dict[str, str], submission_id: str) -> str:
    """The job's status as the Jobs API reports it, asked with the cluster's token."""
    query = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", query, address, submission_id], env=environment, capture_output=True, text=True, timeout=60
    )
    return completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr[-2000:]


def test_ray_job_submit_trains_the_smoke_config(head_node, pattern_dataset):
    address, gcs_address, environment, base_dir = head_node
    submission_id = "imgcls-e2e-train"
    submit = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
        "--working-dir", str(REPO_ROOT), "--",
        "python", "jobs/train.py", "--config", "examples/configs/smoke.yaml",
        "--set", f"data.train={pattern_dataset}", "--set", "data.image_size=[16, 16]",
        "--set", "data.channels=3", "--set", "output_dir=runs/e2e",
    ]  # fmt: skip
    for _ in range(12):
        completed = subprocess.run(submit, env=environment, capture_output=True, text=True, timeout=600)
        output = completed.stdout + completed.stderr
        # A fresh head node accepts jobs once its dashboard agent has registered.
        if "No available agent" not in output:
            break
        time.sleep(5)
    assert completed.returncode == 0, output[-4000:]
    assert job_status(address, environment, submission_id) == "SUCCEEDED"
    # The relative output_dir resolved against IMGCLS_BASE_DIR, not the job's uploaded copy.
    artifact = base_dir / "runs" / "e2e" / "model"
    assert (artifact / "model.keras").is_file() and (artifact / "metadata.json").is_file()
    assert "epoch 1/1" in output

    predict = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", str(artifact),
         "--input", str(pattern_dataset), "--output", str(base_dir / "predictions")],
        env={**environment, "RAY_ADDRESS": gcs_address}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-4000:]
    table = pads.dataset(str(base_dir / "predictions"), format="parquet").to_table()
    assert table.num_rows == len(list(pattern_dataset.rglob("*.png")))
