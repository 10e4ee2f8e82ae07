"""Shared fixtures: one real local Ray per session, tiny image folders made on the fly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests start their own clusters and tracking servers; a developer's RAY_ADDRESS or MLflow server
# must not leak into them.
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from image_factory import write_pattern_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
TEST_BUCKET = "imgcls-test"
# Distinctive fake credentials, so a test can prove they never leak into logs or files.
TEST_ACCESS_KEY = "AKIAIMGCLSTESTLEAKCHECK"
TEST_SECRET_KEY = "imgcls-secret-d0-not-leak-7f3a9c"


# Fixtures that start a real service (Ray, an S3 endpoint) or need one: a test that uses any of them,
# directly or through another fixture, is marked `services` and left out of `make test-fast`.
SERVICE_FIXTURES = {"ray_session", "s3_endpoint", "ceph_rgw_endpoint", "trained_one_worker", "mlflow_server",
                    "mlflow_server_if_installed"}


# The modules that train or start clusters, longest first (`make test` hands whole modules to its
# processes in collection order: one of these picked up last would run alone at the end). The others
# follow in their usual order. Their measured times are in README, Development.
LONGEST_MODULES_FIRST = (
    "test_tracking.py", "test_fault_tolerance.py", "test_training_job.py", "test_jobs_e2e.py", "test_predict.py",
    "test_s3.py", "test_storage_faults.py", "test_transfer.py", "test_registry.py", "test_multilabel_training.py",
    "test_export.py", "test_train.py", "test_monitoring.py", "test_ceph_rgw.py", "test_chunked_commits.py",
    "test_tensorboard.py", "test_cluster_training.py", "test_nightly.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
    rank = {name: position for position, name in enumerate(LONGEST_MODULES_FIRST)}
    # A stable sort: each module's tests keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API over HTTP: moto's server on 127.0.0.1, with one bucket. Set up before Ray
    starts so that every Ray worker inherits the endpoint and credentials from the environment."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=TEST_BUCKET)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ceph_rgw_endpoint(s3_endpoint, tmp_path_factory):
    """A second real S3 server: Ceph's RADOS Gateway on 127.0.0.1 (tests/ceph_rgw.py), with one bucket
    and a user whose keys are the suite's, so the environment's credentials fit both servers. Its
    packages are installed with apt-get when missing; where they cannot be, the tests skip."""
    import boto3
    import ceph_rgw

    reason = ceph_rgw.ensure_binaries()
    if reason:
        pytest.skip(reason)
    gateway = ceph_rgw.start(tmp_path_factory.mktemp("ceph_rgw"), TEST_ACCESS_KEY, TEST_SECRET_KEY)
    try:
        boto3.client("s3", endpoint_url=gateway.endpoint, region_name="us-east-1").create_bucket(Bucket=TEST_BUCKET)
        yield gateway.endpoint
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (tests/mlflow_server.py), started once; its URI."""
    pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server_if_installed(request) -> str | None:
    """The suite's MLflow server when the tracking extra is installed, else None: the fault tests that
    also check tracking still test the fault without it."""
    import importlib.util

    return request.getfixturevalue("mlflow_server") if importlib.util.find_spec("mlflow") else None


def upload_tree(local_root: Path, bucket: str, prefix: str, endpoint_url: str | None = None) -> list[str]:
    """Upload every file under `local_root` to s3://bucket/prefix/... (on the environment's endpoint
    unless given one); returns the URIs."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ["AWS_ENDPOINT_URL"])
    uris = []
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
            client.upload_file(str(path), bucket, key)
            uris.append(f"s3://{bucket}/{key}")
    return uris


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A real 2-CPU Ray on loopback, started once for the whole suite."""
    import ray

    from imgcls.platform.ray_runtime import ensure_ray

    # The jobs' own local Ray (loopback, token auth, dashboard for Ray Train's placement-group cleaner).
    ensure_ray(num_cpus=2)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@contextmanager
def shared_by_the_test_processes(tmp_path_factory, worker_id: str, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder every process of this `pytest -n` run shares (its own one without -n), held under
    a file lock: (folder, whether it is complete). The first process to get the lock builds it, the
    others wait and reuse it, so an expensive session fixture is made once per run, not per process."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # every xdist process's base folder is inside the run's own one
        root = root.parent
    folder = root / f"shared_{name}"
    with FileLock(str(folder) + ".lock"):
        yield folder, (folder / ".complete").exists()


@pytest.fixture(scope="session")
def pattern_dataset(tmp_path_factory, worker_id) -> Path:
    """Two learnable classes (horizontal vs vertical stripes), 48 images each, 16x16 PNG."""
    with shared_by_the_test_processes(tmp_path_factory, worker_id, "patterns") as (folder, complete):
        if not complete:
            write_pattern_dataset(folder / "train", per_class=48, num_classes=2, size=IMAGE_SIZE, seed=1)
            (folder / ".complete").touch()
    return folder / "train"


@pytest.fixture(scope="session")
def pattern_holdout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patterns_holdout") / "test"
    write_pattern_dataset(root, per_class=10, num_classes=2, size=IMAGE_SIZE, seed=2)
    return root


def tiny_job_overrides(train_uri: Path, output_dir: Path, workers: int = 1, epochs: int = 4) -> list[str]:
    return [
        f"data.train={train_uri}",
        f"data.image_size=[{IMAGE_SIZE}, {IMAGE_SIZE}]",
        "data.val_fraction=0.25",
        f"train.epochs={epochs}",
        "train.batch_size=16",
        f"scaling.num_workers={workers}",
        f"output_dir={output_dir}",
    ]


@pytest.fixture(scope="session")
def trained_one_worker(request, pattern_dataset, tmp_path_factory, worker_id):
    """One real single-worker training run, shared by the train, artifact and predict tests (made
    once per test run: the other processes wait for it and read its result). Tests read it, never
    change it."""
    from imgcls import train
    from imgcls.config import load_job_config

    request.getfixturevalue("ray_session")  # its users expect the suite's Ray, as before it was shared
    with shared_by_the_test_processes(tmp_path_factory, worker_id, "run_one_worker") as (output_dir, complete):
        if complete:
            return train.TrainResult.model_validate_json((output_dir / ".complete").read_text()), output_dir
        config = load_job_config(None, tiny_job_overrides(pattern_dataset, output_dir, workers=1))
        result = train.run(config)
        (output_dir / ".complete").write_text(result.model_dump_json())
    return result, output_dir


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """A real imgcls artifact of the tutorial CNN for 16x16 RGB and two classes, with its initial
    weights, made without Ray or training: for tests of what prediction does around the model."""
    from imgcls.modeling.artifact import save_artifact
    from imgcls.modeling.models import create_seed_cnn

    uri = str(tmp_path_factory.mktemp("tiny_artifact") / "model")
    model = create_seed_cnn((IMAGE_SIZE, IMAGE_SIZE), 3, 2)
    fields = {"class_names": ["horizontal", "vertical"], "image_size": (IMAGE_SIZE, IMAGE_SIZE), "channels": 3,
              "task": "binary", "model_name": "seed_cnn"}  # fmt: skip
    save_artifact(model, fields, uri)
    return uri


@pytest.fixture(scope="module")
def colour_artifact(tmp_path_factory) -> str:
    """A multi-label artifact (tests/multilabel_factory.py): class k fires when colour channel k is
    bright, with its stored per-class thresholds. Made once per module that uses it."""
    from multilabel_factory import save_colour_artifact

    uri = str(tmp_path_factory.mktemp("colour_artifact") / "model")
    save_colour_artifact(uri)
    return uri
