"""Bulk prediction on a real multi-node Ray (separate raylets on this machine, each started with
`ray start` as an operator would): the node hosting one of the model actors is SIGKILLed mid-run;
the elastic pool finishes on the other or the run fails within its stall limit, and after the rerun
every image has exactly one row. And a pool that can never run
(it asks for a resource no node has) fails within its stall limit, saying what it waited for."""

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


class NodeExited(AssertionError):
    """The joining node's `ray start` gave up (Ray allows a raylet a fixed 30 s to register)."""


def wait_for_nodes(address: str, environment: dict[str, str], count: int, logs: list[Path], timeout: float = 120,
                   joining: "RayNode | None" = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while (live := live_nodes(address, environment)) != count:
        if joining is not None and joining.process.poll() is not None:
            raise NodeExited(f"the joining node's ray start exited with {joining.process.returncode}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"{log.name}: {log.read_text()[-1500:]}" for log in logs if log.exists())
            raise AssertionError(f"the cluster has {live} live nodes, not {count}:\n{tails}")
        time.sleep(1)


@pytest.fixture
def cluster(tmp_path):
    """A head and a second node, 2 CPUs each, both with the custom resource `model_node` that each of
    the run's two model actors asks for: so one actor really runs on the node the test kills."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Token authentication, as cluster/local/start.sh sets it up: the nodes and every client share it.
    token = tmp_path / "auth_token"
    subprocess.run([str(REPO_ROOT / "cluster" / "make_token.sh"), str(token)], check=True, capture_output=True)
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    # Ray's socket paths must stay under 107 bytes: a short folder of its own, not pytest's.
    temp_dir = tempfile.mkdtemp(prefix="imgcls-rc-", dir="/tmp")
    model_node = '--resources={"model_node": 1}'
    head = RayNode(["--head", f"--port={port}", "--num-cpus=2", model_node, "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", f"--temp-dir={temp_dir}"], tmp_path / "head.log", environment)  # fmt: skip
    nodes = [head]
    try:
        wait_for_nodes(address, environment, 1, [head.log])
        for attempt in (1, 2):
            joining = RayNode([f"--address={address}", "--num-cpus=2", model_node], tmp_path / f"node{attempt}.log",
                              environment)  # fmt: skip
            nodes.append(joining)
            try:
                wait_for_nodes(address, environment, 2, [node.log for node in nodes], joining=joining)
                break
            except NodeExited:
                if attempt == 2:  # on a busy machine (the suite's other process) once more, then fail
                    raise
        yield address, environment, nodes[-1]
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_records(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "_runs").glob("*.json"))]


def visible_paths(output: Path) -> list[str]:
    return pads.dataset(str(output), format="parquet").to_table(columns=["path"]).column("path").to_pylist()


# The pool's stall limit in the node-loss test: its actors start TensorFlow within it, also while
# the suite's other process keeps the CPUs busy.
STALL_S = 90


# Long: beside the suite's other process (pytest -n 2) on 2 cores, its pool's actors did not start
# within even 90 s twice in a row; alone (make test-long) it takes about 90 s.
@pytest.mark.long
def test_killing_a_model_actors_node_mid_run_finishes_on_the_rest_or_fails_within_the_stall_limit(
    cluster, tiny_artifact, tmp_path
):
    """Ray Data's recovery of the lost actor's blocks sometimes goes through (the elastic pool finishes
    on the other actor) and sometimes waits for good: either way the run ends within its stall limit,
    and after the rerun every image has exactly one row."""
    address, environment, victim = cluster
    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=1200, size=16, seed=21)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", tiny_artifact, "--input", str(images),
               "--output", str(output), "--batch-size", "4", "--set", "decode_batch_size=16"]  # fmt: skip
    pooled = [*command, "--set", "placement=actor_pool", "--set", "num_actors=2", "--set", "actor_resources={model_node: 1}",
              "--set", "commit_every_images=200", "--set", f"stall_timeout_s={STALL_S}"]  # fmt: skip
    run = subprocess.Popen(pooled, env={**environment, "RAY_ADDRESS": address}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run_records(output) if (output / "_runs").exists() else [{}])[0].get("chunks"):
        assert time.monotonic() < deadline and run.poll() is None, f"no chunk committed: {run.communicate()[1][-3000:]}"
        time.sleep(0.05)
    victim.kill()
    killed_at = time.monotonic()
    _, stderr = run.communicate(timeout=STALL_S + 120)  # never a hang: the stall limit plus 2 minutes
    took = time.monotonic() - killed_at
    (record,) = run_records(output)
    committed = sum(chunk["rows"] for chunk in record["chunks"])
    if run.returncode == 0:
        assert record["status"] == "succeeded" and committed == 2400, stderr[-3000:]
    else:
        assert run.returncode == 1, stderr[-3000:]
        assert f"failed: no progress for {STALL_S} s from the model actor pool" in stderr and "died" in stderr, stderr[-3000:]
        assert record["status"] == "failed" and "no progress" in record["error"]
    paths = visible_paths(output)
    assert len(paths) == committed and len(set(paths)) == committed  # whole chunks, each image once
    print(f"killed a model actor's node: exit {run.returncode} {took:.1f} s later, {committed} rows committed")

    # The rerun, here in the job's own process: only what no committed chunk holds.
    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"2400 images listed, {committed} already done, {2400 - committed} classified" in rerun.stderr + rerun.stdout
    paths = visible_paths(output)
    assert len(paths) == 2400 and len(set(paths)) == 2400  # every image exactly once


# Stopping the stalled dataset ends Ray Data's executor thread with SystemExit inside its ray.get, which
# Python's threads treat as a quiet exit; only pytest's thread hook reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_pool_that_cannot_run_fails_within_its_stall_limit_and_says_why(ray_session, tiny_artifact, tmp_path, capsys):
    from imgcls.cli import main

    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=20, size=16, seed=22)
    output = tmp_path / "out"
    started = time.monotonic()
    code = main(["predict", "--model", tiny_artifact, "--input", str(images), "--output", str(output),
                 "--set", "actor_resources={imgcls_gpu_node: 1}", "--set", "stall_timeout_s=8"])  # fmt: skip
    took = time.monotonic() - started
    message = capsys.readouterr().err
    assert code == 1 and took < 8 + 120, message
    assert "failed: no progress for 8 s from the model actor pool (0 batches had arrived)" in message, message
    assert "1 imgcls_gpu_node" in message and "live node(s)" in message, message
    (record,) = run_records(output)
    assert record["status"] == "failed" and "no progress for 8 s" in record["error"] and record["chunks"] == []
    assert not list(output.glob("run-*")) and not (output / "_staging").exists()
