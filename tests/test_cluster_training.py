"""Training on a real multi-node Ray (separate raylets on this machine, each started with `ray start`
as an operator would), checkpoints and output in the moto bucket. Two workers are pinned to two
nodes by the custom resource `trainer_slot`; after the first checkpoint the node hosting the second
worker loses its raylet (SIGKILL). Then, by the config and the cluster:

- a replacement node comes: the run resumes from the checkpoint on it and finishes;
- `scaling.min_workers=1`: the run continues with one worker and finishes;
- neither: the run fails within `scaling.reschedule_timeout_s` (+ slack) with exit 1 and a message
  naming the missing resource, and keeps its checkpoints.

Each run's history has every epoch exactly once, and a finished run writes its artifact."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import REPO_ROOT, TEST_BUCKET
from image_factory import write_pattern_dataset
from multinode import LocalCluster

pytestmark = pytest.mark.services

SLOT = "trainer_slot"
EPOCHS = 5
# Epochs of a few seconds on two loaded cores: the kill lands mid-training, the run stays short.
RUN = [
    "data.image_size=[16, 16]", "data.channels=3", "data.val_fraction=0.1", "model.name=cnn",
    "model.filters=[16, 32]", "train.batch_size=16", f"train.epochs={EPOCHS}", "train.checkpoint_every_epochs=1",
    "train.max_failures=1", "scaling.num_workers=2", f"scaling.resources_per_worker={{{SLOT}: 1}}",
]  # fmt: skip
# Seconds a run may take from the kill to its end besides its own bound: the lost worker's detection,
# the restart, and the rest of the epochs on two busy cores.
SLACK_S = 120


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster_training") / "train"
    write_pattern_dataset(root, per_class=500, size=16, seed=7)
    return root


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """The head (the driver, Ray Data and one training worker) with one trainer_slot; each test
    adds the node that hosts the second worker. Started after the S3 endpoint, so every node's
    processes have its credentials."""
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=3, resources={SLOT: 1})
        yield cluster
    finally:
        leftovers = cluster.stop()
        assert not leftovers, f"processes of the test cluster still running: {leftovers}"


@pytest.fixture
def nodes(cluster):
    """Nodes added by one test, killed at its end, so that the next test starts with the head alone."""
    added: list[str] = []

    def add(name: str) -> str:
        cluster.add_node(name, num_cpus=1, resources={SLOT: 1})
        added.append(name)
        return name

    yield add
    for name in added:
        if cluster.nodes[name].raylet() is not None:
            cluster.kill_node(name)  # seen dead before the next test's job starts (see `add_victim`)


class Job:
    """`python jobs/train.py` joined to the cluster through RAY_ADDRESS, its output in a log file."""

    def __init__(self, cluster: LocalCluster, output_uri: str, endpoint: str, data: Path, log: Path, extra: list[str]):
        settings = [*RUN, f"data.train={data}", f"output_dir={output_uri}", f"storage.endpoint_url={endpoint}", *extra]
        command = [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config",
                   str(REPO_ROOT / "examples" / "configs" / "smoke.yaml")]  # fmt: skip
        for setting in settings:
            command += ["--set", setting]
        self.log = log
        self.process = subprocess.Popen(
            command, env=cluster.driver_environment(), stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float) -> float:
        """Waits until `text` appears in the job's output; returns that moment (time.monotonic)."""
        started = time.monotonic()
        while text not in self.output():
            if self.process.poll() is not None and text not in self.output():
                raise AssertionError(f"the job ended (exit {self.process.returncode}) without {text!r}:\n{self.tail()}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no {text!r} after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the job was still running {timeout:.0f} s later:\n{self.tail()}") from None

    def tail(self, characters: int = 6000) -> str:
        return self.output()[-characters:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.stop()


class Bucket:
    def __init__(self, endpoint: str, prefix: str):
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.prefix = prefix

    @property
    def uri(self) -> str:
        return f"s3://{TEST_BUCKET}/{self.prefix}"

    def keys(self, under: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=f"{self.prefix}/{under}")
        return [entry["Key"][len(self.prefix) + 1 :] for page in pages for entry in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=TEST_BUCKET, Key=f"{self.prefix}/{key}")["Body"].read()

    def checkpoint_epochs(self) -> list[int]:
        epochs = []
        for key in self.keys("checkpoints/train/"):
            if key.endswith("/state.json"):
                try:
                    epochs.append(json.loads(self.read(key))["epoch"])
                except (ValueError, KeyError, self.client.exceptions.NoSuchKey):
                    pass  # being written
        return sorted(epochs)

    def wait_for_recorded_checkpoint(self, timeout: float = 300) -> None:
        """A checkpoint uploaded and recorded in Ray Train's run snapshot: what a restart resumes from."""
        deadline = time.monotonic() + timeout
        snapshot = "checkpoints/train/checkpoint_manager_snapshot.json"
        while True:
            names = {key.split("/")[2] for key in self.keys("checkpoints/train/checkpoint_") if key.endswith("/state.json")}
            if names and snapshot in self.keys("checkpoints/train/"):
                text = self.read(snapshot).decode()
                if any(name in text for name in names):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint recorded under {self.uri} after {timeout:.0f} s")
            time.sleep(0.3)

    def history(self) -> list[dict]:
        return list(csv.DictReader(io.StringIO(self.read("history.csv").decode())))


def training_worker_on(cluster: LocalCluster, node: str) -> bool:
    """Whether a Ray Train worker process runs under this node's raylet."""
    raylet = cluster.nodes[node].raylet()
    return raylet is not None and any(
        "RayTrainWorker" in " ".join(child.cmdline()) for child in raylet.children(recursive=True) if child.is_running()
    )


def wait_for_earlier_nodes_gone(cluster: LocalCluster, keep: tuple[str, ...] = ()) -> None:
    """Every node an earlier test killed seen dead: a job must plan with the head (and `keep`) only."""
    for name, record in cluster.node_states().items():
        if name not in ("head", *keep) and record.get("state") != "DEAD":
            cluster.wait_for_node_state(name, "DEAD")


def add_victim(cluster: LocalCluster, nodes) -> str:
    """The node for the second worker."""
    victim = nodes("victim")
    wait_for_earlier_nodes_gone(cluster, keep=(victim,))
    return victim


def start_and_kill_after_checkpoint(cluster, nodes, jobs, bucket, slow_dataset, tmp_path, endpoint, extra) -> tuple[Job, float]:
    """Two workers on the head and the victim node; SIGKILL of the victim's raylet once a checkpoint
    is recorded and while training goes on. Returns the job and the moment of the kill."""
    victim = add_victim(cluster, nodes)
    job = Job(cluster, bucket.uri, endpoint, slow_dataset, tmp_path / "job.log", extra)
    jobs.append(job)
    bucket.wait_for_recorded_checkpoint()
    assert training_worker_on(cluster, victim), "the second training worker is not on the victim node"
    assert job.process.poll() is None and bucket.checkpoint_epochs()[-1] < EPOCHS, "training ended before the kill"
    cluster.kill_node(victim)
    return job, time.monotonic()


def assert_finished_consistently(job: Job, bucket: Bucket, timeout: float) -> list[dict]:
    assert job.wait(timeout) == 0, job.tail()
    history = bucket.history()
    assert [int(row["epoch"]) for row in history] == list(range(1, EPOCHS + 1)), history
    assert "model/metadata.json" in bucket.keys("model/") and "model/model.keras" in bucket.keys("model/")
    return history


@pytest.mark.long  # three minutes beside the suite's other processes: `make test-long`
def test_lost_node_is_replaced_and_training_resumes_on_it(cluster, nodes, jobs, s3_endpoint, slow_dataset, tmp_path):
    bucket = Bucket(s3_endpoint, "cluster-training/replaced")
    job, killed = start_and_kill_after_checkpoint(cluster, nodes, jobs, bucket, slow_dataset, tmp_path, s3_endpoint, [])
    nodes("replacement")
    resumed_after = job.wait_for_line("resuming from the checkpoint after epoch", timeout=SLACK_S) - killed
    assert training_worker_on(cluster, "replacement"), "the lost worker's place is not on the replacement node"
    assert_finished_consistently(job, bucket, timeout=SLACK_S)
    assert "continuing with" not in job.output()  # two workers again: the replacement took the lost one's place
    print(f"kill to resume on the replacement node: {resumed_after:.1f} s")


@pytest.mark.long  # minutes: `make test-long`
def test_elastic_run_continues_with_one_worker(cluster, nodes, jobs, s3_endpoint, slow_dataset, tmp_path):
    bucket = Bucket(s3_endpoint, "cluster-training/elastic")
    job, killed = start_and_kill_after_checkpoint(
        cluster, nodes, jobs, bucket, slow_dataset, tmp_path, s3_endpoint, ["scaling.min_workers=1"]
    )  # fmt: skip
    continued_after = job.wait_for_line("continuing with 1 of 2 workers: global batch 32 (32 per worker)", SLACK_S) - killed
    history = assert_finished_consistently(job, bucket, timeout=SLACK_S)
    workers = [int(row["workers"]) for row in history]
    assert workers[0] == 2 and workers[-1] == 1, workers
    print(f"kill to continuing with one worker: {continued_after:.1f} s")


@pytest.mark.long  # minutes: `make test-long`
def test_fixed_size_run_fails_within_the_reschedule_bound(cluster, nodes, jobs, s3_endpoint, slow_dataset, tmp_path):
    bound = 20
    bucket = Bucket(s3_endpoint, "cluster-training/bounded")
    job, killed = start_and_kill_after_checkpoint(
        cluster, nodes, jobs, bucket, slow_dataset, tmp_path, s3_endpoint, [f"scaling.reschedule_timeout_s={bound}"]
    )  # fmt: skip
    code = job.wait(timeout=bound + SLACK_S)
    failed_after = time.monotonic() - killed
    output = job.output()
    assert code == 1, job.tail()
    message = output[output.index("imgcls train: failed: ") :]
    assert "the 2 training workers (2 x {CPU: 1, trainer_slot: 1})" in message, message
    assert "1 trainer_slot" in message and "died" in message and bucket.uri in message, message
    # One paragraph from the driver; a waiting controller says so in a line, not a traceback.
    assert not any(line.startswith("Traceback") for line in output.splitlines()), job.tail()
    assert "no room in the cluster for the 2 training workers yet" in output
    assert "raise WorkerGroupStartupTimeoutError" not in output, job.tail()
    assert bucket.checkpoint_epochs(), "the checkpoints must stay for a rerun"
    assert "model/metadata.json" not in bucket.keys("model/")
    print(f"kill to exit 1: {failed_after:.1f} s (bound {bound} s)")


def test_elastic_run_below_min_workers_fails_within_the_bound(cluster, jobs, s3_endpoint, tmp_path_factory, tmp_path):
    """Ray Train's elastic policy waits without any limit while fewer than min_workers fit: the
    bound ends it. The head's one trainer_slot is short of min_workers=2 from the start."""
    wait_for_earlier_nodes_gone(cluster)
    data = tmp_path_factory.mktemp("few_images") / "train"
    write_pattern_dataset(data, per_class=40, size=16, seed=8)
    bound = 15
    bucket = Bucket(s3_endpoint, "cluster-training/elastic-bounded")
    extra = ["scaling.num_workers=3", "scaling.min_workers=2", f"scaling.reschedule_timeout_s={bound}"]
    job = Job(cluster, bucket.uri, s3_endpoint, data, tmp_path / "job.log", extra)
    jobs.append(job)
    waiting = job.wait_for_line("waiting up to scaling.reschedule_timeout_s=15 s", timeout=SLACK_S)
    assert job.wait(timeout=bound + SLACK_S) == 1, job.tail()
    message = job.output()[job.output().index("imgcls train: failed: ") :]
    assert "at least scaling.min_workers=2 of the 3 training workers" in message and "1 trainer_slot" in message, message
    print(f"elastic run below min_workers: exit 1 {time.monotonic() - waiting:.1f} s after it began to wait (bound {bound} s)")
