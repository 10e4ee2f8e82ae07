"""End to end through the real CLI: the cluster of `cluster/local/start.sh` and `ray job submit`."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, free_port

VENV_BIN = Path(sys.executable).parent
START = REPO_ROOT / "cluster" / "local" / "start.sh"
STOP = REPO_ROOT / "cluster" / "local" / "stop.sh"
SUBMIT = REPO_ROOT / "cluster" / "submit.sh"
RUNTIME_ENV = "cluster/runtime_env.yaml"
# Logical CPUs of the test cluster: the driver's entrypoint CPU, one training worker, one for Ray Data.
HEAD_CPUS = 3


def cluster_processes(temp_dir: str, gcs_port: int) -> list:
    """Processes that name the cluster's temp dir or its GCS address (the Ray Client server does)."""
    import psutil

    address = re.compile(rf":{gcs_port}(\D|$)")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in argument or address.search(argument) for argument in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_leftovers(processes: list) -> None:
    """Last resort when stop.sh left something behind, so that the suite does not leak processes."""
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=15)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """The single-node Ray of `cluster/local/start.sh`, started as a user would, with its own temp
    dir, ports and token file (so that the test touches neither ~/.ray nor /tmp/ray)."""
    # Unix socket paths must stay short, so the temp dir lives directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="imgcls-ray-", dir="/tmp")
    base_dir = tmp_path_factory.mktemp("job_base")
    # start.sh creates the token file (and its folder) itself.
    token_path = tmp_path_factory.mktemp("ray_token") / "ray" / "auth_token"
    dashboard_port, gcs_port = free_port(), free_port()
    environment = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "IMGCLS_BASE_DIR": str(base_dir),
        "IMGCLS_RAY_TEMP_DIR": temp_dir,
        "IMGCLS_RAY_PORT": str(gcs_port),
        "IMGCLS_DASHBOARD_PORT": str(dashboard_port),
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # What a client needs besides the token file.
        "RAY_AUTH_MODE": "token",
    }
    environment.pop("RAY_ADDRESS", None)
    environment.pop("RAY_AUTH_TOKEN", None)
    # The suite's own Ray already holds the default agent and metrics ports: pick free ones.
    extra = []
    for option in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
    ):  # fmt: skip
        extra += [option, str(free_port())]
    started = subprocess.run(
        [str(START), str(HEAD_CPUS), *extra], env=environment, capture_output=True, text=True, timeout=180
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {
            "address": address,
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "dashboard_port": dashboard_port,
            "environment": environment,
            "base_dir": base_dir,
            "token_path": token_path,
        }
    finally:
        # An exported COLUMNS (some CI runners, pytest-xdist workers) must not cut ps output short.
        stopped = subprocess.run([str(STOP)], env={**environment, "COLUMNS": "80"}, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        leftovers = cluster_processes(temp_dir, gcs_port)
        kill_leftovers(leftovers)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not leftovers, f"cluster/local/stop.sh left {[p.pid for p in leftovers]} running"


def authorized_get(head: dict, path: str):
    """GET from the Jobs REST API with the cluster's token, as any HTTP client can."""
    token = head["token_path"].read_text().strip()
    request = urllib.request.Request(head["address"] + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def submit(head: dict, submission_id: str, entrypoint: list[str], environment: dict | None = None):
    """`ray job submit` as the README shows it, from the checkout, retried while a fresh head node's
    agent has not registered yet."""
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", submission_id,
        "--runtime-env", RUNTIME_ENV, "--entrypoint-num-cpus", "1", "--", *entrypoint,
    ]  # fmt: skip
    for _ in range(12):
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=environment or head["environment"], capture_output=True, text=True, timeout=600
        )
        output = completed.stdout + completed.stderr
        if "No available agent" not in output:
            break
        time.sleep(5)
    return completed, output


def test_local_cluster_keeps_the_jobs_api_on_loopback_and_the_token_private(head_node):
    import psutil

    token_path = head_node["token_path"]
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
    assert len(token_path.read_text().strip()) >= 32

    port = head_node["dashboard_port"]
    listening = [
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]
    assert listening and set(listening) == {"127.0.0.1"}, listening

    from ray._private.services import get_node_ip_address

    node_ip = get_node_ip_address()
    if not node_ip.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((node_ip, port), timeout=5).close()


def http_status(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_jobs_api_refuses_callers_without_the_token(head_node, tmp_path):
    address = head_node["address"]
    marker = tmp_path / "the_job_ran"
    entrypoint = ["python", "-c", f"open({str(marker)!r}, 'w').write('ran')"]
    # A client with no token anywhere: no RAY_AUTH_* variables and a HOME without ~/.ray/auth_token.
    tokenless = {
        key: value
        for key, value in head_node["environment"].items()
        if not key.startswith("RAY_AUTH") and key != "HOME"
    }
    tokenless["HOME"] = str(tmp_path)
    refused, output = submit(head_node, "imgcls-e2e-no-token", entrypoint, environment=tokenless)
    assert refused.returncode != 0, output[-3000:]
    assert "401" in output or "Authentication required" in output, output[-3000:]
    # Token mode on, but the wrong token.
    wrong = {**tokenless, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    refused, output = submit(head_node, "imgcls-e2e-wrong-token", entrypoint, environment=wrong)
    assert refused.returncode != 0, output[-3000:]
    assert "403" in output or "Authentication failed" in output, output[-3000:]

    # The Jobs REST API itself, as an attacker would call it.
    jobs = f"{address}/api/jobs/"
    job = {"entrypoint": " ".join(entrypoint), "submission_id": "imgcls-e2e-rest"}
    assert http_status(jobs) == 401
    assert http_status(jobs, "POST", body=job) == 401
    assert http_status(jobs, "POST", {"Authorization": "Bearer " + "0" * 64}, job) == 403
    assert http_status(jobs, "POST", {"X-Ray-Authorization": "Bearer " + "0" * 64}, job) == 403
    assert http_status(f"{address}/api/version") == 401

    # With the token the same API answers, and none of the refused jobs exists or ran.
    submitted = {job.get("submission_id") for job in authorized_get(head_node, "/api/jobs/")}
    assert not submitted & {"imgcls-e2e-no-token", "imgcls-e2e-wrong-token", "imgcls-e2e-rest"}
    assert not marker.exists()


def test_ray_job_submit_trains_the_smoke_config(head_node, pattern_dataset):
    environment, base_dir = head_node["environment"], head_node["base_dir"]
    submission_id = "imgcls-e2e-train"
    completed, output = submit(
        head_node,
        submission_id,
        ["python", "jobs/train.py", "--config", "examples/configs/smoke.yaml",
         "--set", f"data.train={pattern_dataset}", "--set", "data.image_size=[16, 16]",
         "--set", "data.channels=3", "--set", "output_dir=runs/e2e"],
    )  # fmt: skip
    assert completed.returncode == 0, output[-4000:]
    info = authorized_get(head_node, f"/api/jobs/{submission_id}")
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0
    assert info["runtime_env"]["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "2"  # cluster/runtime_env.yaml
    # The driver ran in Ray's job supervisor actor, which held the CPU of --entrypoint-num-cpus 1.
    supervisor = authorized_get(
        head_node,
        "/api/v0/actors?detail=1&filter_keys=name&filter_predicates=%3D"
        f"&filter_values=_ray_internal_job_actor_{submission_id}",
    )["data"]["result"]["result"]
    assert [actor["required_resources"] for actor in supervisor] == [{"CPU": 1.0}]
    # The check a schedule adds after `ray job submit` (README, Operations).
    status = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "status", "--address", head_node["address"], submission_id],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr
    # The relative output_dir resolved against IMGCLS_BASE_DIR, not the job's uploaded copy.
    artifact = base_dir / "runs" / "e2e" / "model"
    assert (artifact / "model.keras").is_file() and (artifact / "metadata.json").is_file()
    assert "epoch 1/1" in output

    predict = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", str(artifact),
         "--input", str(pattern_dataset), "--output", str(base_dir / "predictions"), "--set", "num_actors=1"],
        env={**environment, "RAY_ADDRESS": head_node["gcs_address"]}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-4000:]
    table = pads.dataset(str(base_dir / "predictions"), format="parquet").to_table()
    assert table.num_rows == len(list(pattern_dataset.rglob("*.png")))


def test_a_failed_job_fails_ray_job_submit_and_submit_sh_passes_on_its_exit_code(head_node):
    """What alerting relies on: `ray job submit` exits 1 for a failed job, the Jobs API keeps the
    driver's own exit code, and cluster/submit.sh exits with it (2: a user error)."""
    entrypoint = ["python", "jobs/train.py", "--config", "examples/configs/smoke.yaml", "--set", "train.no_such_key=1"]
    completed, output = submit(head_node, "imgcls-e2e-user-error", entrypoint)
    assert completed.returncode == 1, output[-4000:]
    info = authorized_get(head_node, "/api/jobs/imgcls-e2e-user-error")
    assert info["status"] == "FAILED" and info["driver_exit_code"] == 2
    assert "no_such_key" in output

    wrapped = subprocess.run(
        [str(SUBMIT), "--address", head_node["address"], "--runtime-env", RUNTIME_ENV, "--entrypoint-num-cpus", "1",
         "--", *entrypoint],
        cwd=REPO_ROOT, env=head_node["environment"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert wrapped.returncode == 2, wrapped.stdout[-3000:] + wrapped.stderr[-3000:]
    assert "FAILED, driver exit code 2; exit 2" in wrapped.stderr


def test_submit_sh_fails_for_a_job_stopped_halfway(head_node):
    """`ray job submit` exits 0 when someone stops the job; cluster/submit.sh exits 1."""
    submission_id = "imgcls-e2e-stopped"
    wrapper = subprocess.Popen(
        [str(SUBMIT), "--submission-id", submission_id, "--runtime-env", RUNTIME_ENV, "--",
         "python", "-c", "import time; time.sleep(300)"],
        cwd=REPO_ROOT, env={**head_node["environment"], "RAY_ADDRESS": head_node["address"]},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if authorized_get(head_node, f"/api/jobs/{submission_id}")["status"] == "RUNNING":
                    break
            except urllib.error.HTTPError:
                pass  # not submitted yet
            assert time.monotonic() < deadline and wrapper.poll() is None, "the job never ran"
            time.sleep(1)
        token = head_node["token_path"].read_text().strip()
        stop = urllib.request.Request(
            f"{head_node['address']}/api/jobs/{submission_id}/stop", method="POST",
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        urllib.request.urlopen(stop, timeout=30).close()
        output, _ = wrapper.communicate(timeout=120)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert wrapper.returncode == 1, output[-3000:]
    assert f"job {submission_id} STOPPED" in output
