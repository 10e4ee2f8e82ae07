"""Bulk prediction on a real multi-node Ray (separate raylets on this machine, each started with
`ray start` as an operator would): the node hosting the model actor is SIGKILLed mid-run. The run
fails within its stall limit with what it waited for, keeps its committed chunks, and the rerun
completes the rest: every image exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, free_port
from image_factory import write_pattern_dataset

pytestmark = pytest.mark.services

RAY = str(Path(sys.executable).with_name("ray"))


class RayNode:
    """One `ray start --block` process group: SIGKILL of the group is the node dying (its raylet,
    and the workers and actors it started)."""

    def __init__(self, arguments: list[str], log: Path, environment: dict[str, str]) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *arguments],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=environment,
        )  # fmt: skip

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def live_nodes(address: str, environment: dict[str, str]) -> int:
    script = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" % address
    try:
        finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=environment)
    except subprocess.TimeoutExpired:
        return 0
    return int(finished.stdout.strip().splitlines()[-1]) if finished.returncode == 0 else 0


def wait_for_nodes(address: str, environment: dict[str, str], count: int, logs: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (live := live_nodes(address, environment)) != count:
        if time.monotonic() > deadline:
            tails = "\n".join(f"{log.name}: {log.read_text()[-1500:]}" for log in logs if log.exists())
            raise AssertionError(f"the cluster has {live} live nodes, not {count}:\n{tails}")
        time.sleep(1)


@pytest.fixture
def cluster(tmp_path):
    """A head with 1 CPU (decoding) and a node with 1 CPU and the custom resource `model_node`, which
    the run's model actor asks for: so the actor really runs on the node the test kills."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Token authentication, as cluster/local/start.sh sets it up: the nodes and every client share it.
    token = tmp_path / "auth_token"
    subprocess.run([str(REPO_ROOT / "cluster" / "make_token.sh"), str(token)], check=True, capture_output=True)
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    # Ray's socket paths must stay under 107 bytes: a short folder of its own, not pytest's.
    temp_dir = tempfile.mkdtemp(prefix="imgcls-rc-", dir="/tmp")
    nodes = [RayNode(["--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                      "--include-dashboard=false", f"--temp-dir={temp_dir}"], tmp_path / "head.log", environment)]  # fmt: skip

    def add_model_node() -> RayNode:
        node = RayNode([f"--address={address}", "--num-cpus=1", '--resources={"model_node": 1}'],
                       tmp_path / f"node{len(nodes)}.log", environment)  # fmt: skip
        nodes.append(node)
        return node

    try:
        wait_for_nodes(address, environment, 1, [node.log for node in nodes])
        yield address, environment, add_model_node, lambda count: wait_for_nodes(
            address, environment, count, [node.log for node in nodes]
        )
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_records(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "_runs").glob("*.json"))]


def test_killing_the_model_actors_node_fails_within_the_stall_limit_and_the_rerun_completes(
    cluster, tiny_artifact, tmp_path
):
    address, environment, add_model_node, wait_for_live_nodes = cluster
    victim = add_model_node()
    wait_for_live_nodes(2)
    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=1500, size=16, seed=21)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", tiny_artifact, "--input", str(images),
               "--output", str(output), "--batch-size", "4", "--set", "decode_batch_size=16",
               "--set", "placement=actor_pool", "--set", "num_actors=1", "--set", "actor_resources={model_node: 1}",
               "--set", "commit_every_images=300", "--set", "stall_timeout_s=50"]  # fmt: skip
    environment = {**environment, "RAY_ADDRESS": address}
    run = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_records(output) if (output / "_runs").exists() else [{}])[0].get("chunks"):
        assert time.monotonic() < deadline and run.poll() is None, f"no chunk committed: {run.communicate()[1][-3000:]}"
        time.sleep(0.05)
    victim.kill()
    killed_at = time.monotonic()
    stdout, stderr = run.communicate(timeout=50 + 120)  # never a hang: the stall limit plus 2 minutes
    took = time.monotonic() - killed_at
    assert run.returncode == 1, stderr[-3000:]
    assert "failed: no progress for 50 s from the model actor pool" in stderr, stderr[-3000:]
    assert "model_node" in stderr and "died" in stderr, stderr[-3000:]
    (failed,) = run_records(output)
    committed = sum(chunk["rows"] for chunk in failed["chunks"])
    assert failed["status"] == "failed" and "no progress" in failed["error"] and committed >= 300
    assert pads.dataset(str(output), format="parquet").count_rows() == committed  # whole chunks only
    assert not list((output / "_staging").glob("*/chunk-*/*.parquet"))
    print(f"killed node: run failed {took:.1f} s after the kill, {committed} rows committed")

    # The rerun, say on the operator's machine while the cluster is repaired: in the job's own process.
    rerun_command = [*command[: command.index("--set")], "--set", "placement=driver"]
    without_ray = {key: value for key, value in environment.items() if key != "RAY_ADDRESS"}
    rerun = subprocess.run(rerun_command, env=without_ray, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = run_records(output)
    assert [record["status"] for record in records] == ["failed", "succeeded"]
    assert records[1]["already_done"] == committed
    paths = pads.dataset(str(output), format="parquet").to_table(columns=["path"]).column("path").to_pylist()
    assert len(paths) == 3000 and len(set(paths)) == 3000
