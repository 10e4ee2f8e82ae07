"""Storage faults through a real fault-injecting proxy (tests/fault_proxy.py) in front of a real S3
API: resets, 503 SlowDown and stalls are ridden out by the clients' own retries (bulk prediction
writes exactly the rows of a fault-free run, training finishes every epoch), and an endpoint that
stays down longer than the retry budget fails the run, naming the endpoint, without hanging or
visible output."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pytest
from conftest import TEST_BUCKET, tiny_job_overrides
from fault_proxy import FAULT_KINDS, FaultProxy

from imgcls import predict, train
from imgcls.cli import main
from imgcls.config import PredictConfig, StorageConfig, load_job_config
from imgcls.errors import StorageError
from imgcls.modeling.artifact import read_metadata
from imgcls.platform import storage

PREFIX = "faults"
# Small retry settings for the runs that are meant to give up: the failure comes in seconds.
GIVE_UP_QUICKLY = {"max_attempts": 2, "connect_timeout_s": 1.0, "request_timeout_s": 1.0}
# Long enough for any run here to end; a run that hangs on a dead endpoint never does.
RUN_ENDS_WITHIN_S = 120


@pytest.fixture(scope="session")
def s3_upstream(s3_endpoint) -> str:
    """The S3 endpoint behind the proxy: moto's server (another S3 implementation, a Ceph RGW, can
    be added as a parameter of this fixture). Test data is put there directly, not through the proxy."""
    return s3_endpoint


def upstream_client(s3_upstream: str):
    return boto3.client("s3", endpoint_url=s3_upstream, region_name="us-east-1")


def keys_under(s3_upstream: str, prefix: str) -> list[str]:
    pages = upstream_client(s3_upstream).get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def visible_parquet(s3_upstream: str, prefix: str) -> list[str]:
    """The Parquet files readers see under the prefix (they skip `_` and `.` folders and files)."""
    return [key for key in keys_under(s3_upstream, prefix + "/") if key.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in key[len(prefix) + 1 :].split("/"))]  # fmt: skip


def visible_rows(s3_upstream: str, prefix: str) -> list[dict]:
    location = storage.resolve(f"s3://{TEST_BUCKET}/{prefix}", s3_upstream)
    files = [f"{TEST_BUCKET}/{key}" for key in visible_parquet(s3_upstream, prefix)]
    return pads.dataset(files, filesystem=location.filesystem, format="parquet").to_table().to_pylist()


def run_records(s3_upstream: str, prefix: str) -> list[dict]:
    import json

    client = upstream_client(s3_upstream)
    return [json.loads(client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
            for key in keys_under(s3_upstream, f"{prefix}/_runs/")]  # fmt: skip


def upload(s3_upstream: str, root: Path, prefix: str) -> str:
    client = upstream_client(s3_upstream)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), TEST_BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{TEST_BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def bucket_inputs(s3_upstream, pattern_dataset, tiny_artifact) -> dict[str, str]:
    """96 labelled images and a model artifact in the bucket."""
    return {
        "images": upload(s3_upstream, pattern_dataset, f"{PREFIX}/images"),
        "model": upload(s3_upstream, Path(tiny_artifact), f"{PREFIX}/model"),
    }


@pytest.fixture
def proxy(s3_upstream):
    with FaultProxy(s3_upstream) as running:
        yield running
    storage.configure(StorageConfig())  # the runs here set this process's settings; later tests get the defaults


def ends_within(seconds: float, function: Callable[[], object]) -> tuple[object, BaseException | None, float]:
    """Run `function` on a thread; fail if it has not ended after `seconds` (a hang). Returns its
    result, the exception it raised, and how long it took."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome.get("result"), outcome.get("error"), time.monotonic() - started


def prediction_rows(rows: list[dict]) -> dict[str, tuple]:
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "an image has more than one row"
    return {row["path"]: (row["label"], row["score"], tuple(row["top_k_labels"]), row["error"]) for row in rows}


# The proxy itself: what it forwards arrives byte for byte, and what it injects, the client sees.


def test_the_proxy_forwards_both_clients_byte_for_byte_and_injects_what_it_counts(s3_upstream, proxy):
    import botocore.config
    import botocore.exceptions
    import pyarrow.fs as pafs

    payload = os.urandom(6 * 1024 * 1024 + 123)  # two parts of a multipart upload
    once = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=1, connect_timeout=1)
    client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1", config=once)
    client.put_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/boto", Body=payload)  # Expect: 100-continue
    filesystem = pafs.S3FileSystem(endpoint_override=proxy.url.removeprefix("http://"), scheme="http", region="us-east-1")
    with filesystem.open_output_stream(f"{TEST_BUCKET}/{PREFIX}/proxy/arrow") as stream:  # aws-chunked parts
        stream.write(payload)
    direct = upstream_client(s3_upstream)
    for key in ("boto", "arrow"):
        assert direct.get_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/{key}")["Body"].read() == payload
        assert client.get_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/{key}")["Body"].read() == payload
    assert client.head_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/boto")["ContentLength"] == len(payload)
    assert proxy.forwarded == proxy.requests and not proxy.faults and proxy.records("POST", r"\?uploads$")

    expected = {"reset": botocore.exceptions.ConnectionClosedError, "slowdown": botocore.exceptions.ClientError,
                "stall": botocore.exceptions.ReadTimeoutError}  # fmt: skip
    for kind in FAULT_KINDS:
        proxy.reset_counters()
        proxy.endpoint_down(kinds=(kind,), stall_seconds=float("inf"))
        with pytest.raises(expected[kind]) as raised:
            client.get_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/boto")
        if kind == "slowdown":
            assert raised.value.response["Error"]["Code"] == "SlowDown"
            assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert proxy.faults == {kind: 1} and proxy.requests == 1 and proxy.forwarded == 0
    proxy.heal()
    proxy.reset_counters()
    proxy.fail(0.5, kinds=("slowdown",), methods=frozenset({"HEAD"}), seed=3)
    for _ in range(20):
        client.get_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/proxy/boto")
    assert not proxy.faults, "only HEAD requests were to fail"


def test_a_filesystem_ray_sends_elsewhere_keeps_its_retry_settings(ray_session, s3_upstream, proxy):
    """Ray Train pickles its storage filesystem into its workers; pyarrow's own pickling would drop
    the retry strategy there. Ours is rebuilt from the same settings: exactly max_attempts tries."""
    import ray

    storage.configure(StorageConfig(endpoint_url=proxy.url, max_attempts=2))
    filesystem = storage.resolve(f"s3://{TEST_BUCKET}/{PREFIX}", proxy.url).filesystem
    proxy.endpoint_down(kinds=("slowdown",))

    @ray.remote(num_cpus=0)
    def look_up(remote_filesystem) -> str:
        try:
            remote_filesystem.get_file_info(f"{TEST_BUCKET}/{PREFIX}/anything")
        except OSError as error:
            return str(error)
        return "no error"

    assert "503" in ray.get(look_up.remote(filesystem), timeout=RUN_ENDS_WITHIN_S)
    assert proxy.faults["slowdown"] == proxy.requests == 2


# Faults the retries ride out.


def test_whole_file_reads_ride_out_throttling_even_for_tiny_objects(s3_upstream, proxy):
    """A run marker is a few hundred bytes: smaller than S3's error body, which the AWS SDK cannot
    fit into pyarrow's read buffer (and then does not retry). Such reads go through boto3."""
    upstream_client(s3_upstream).put_object(Bucket=TEST_BUCKET, Key=f"{PREFIX}/tiny.json", Body=b"{}")
    location = storage.resolve(f"s3://{TEST_BUCKET}/{PREFIX}/tiny.json", proxy.url)
    proxy.fail(0.5, kinds=("slowdown",), methods=frozenset({"GET"}), seed=0)
    assert [storage.read_bytes(location) for _ in range(3)] == [b"{}"] * 3
    assert proxy.faults["slowdown"] > 0


def test_bulk_prediction_through_faults_gives_the_rows_of_a_fault_free_run(s3_upstream, bucket_inputs, proxy, record_property):
    bulk_prediction_through_faults(s3_upstream, bucket_inputs, proxy, record_property)


def test_bulk_prediction_through_faults_in_front_of_ceph(ceph_rgw_endpoint, pattern_dataset, tiny_artifact, record_property):
    """The same run with a real S3 server behind the proxy: Ceph's RADOS Gateway checks every
    request's signature, so this also proves the proxy forwards requests unchanged."""
    inputs = {
        "images": upload(ceph_rgw_endpoint, pattern_dataset, f"{PREFIX}/images"),
        "model": upload(ceph_rgw_endpoint, Path(tiny_artifact), f"{PREFIX}/model"),
    }
    try:
        with FaultProxy(ceph_rgw_endpoint) as running:
            bulk_prediction_through_faults(ceph_rgw_endpoint, inputs, running, record_property)
    finally:
        storage.configure(StorageConfig())


def bulk_prediction_through_faults(s3_upstream: str, bucket_inputs: dict[str, str], proxy: FaultProxy, record_property) -> None:
    def run(endpoint: str, name: str):
        return predict.run(PredictConfig(
            model=bucket_inputs["model"], input=bucket_inputs["images"], output=f"s3://{TEST_BUCKET}/{PREFIX}/{name}",
            storage={"endpoint_url": endpoint},
        ))  # fmt: skip

    clean = run(s3_upstream, "predict-clean")
    proxy.fail(0.25, kinds=FAULT_KINDS, stall_seconds=0.5, seed=7)
    faulty = run(proxy.url, "predict-faulty")
    record_property("requests", proxy.requests)
    record_property("faults", dict(proxy.faults))
    record_property("requests_besides_image_reads", len(proxy.records()) - len(proxy.records("GET", rf"/{PREFIX}/images/")))
    assert clean.images_listed == faulty.images_listed == 96
    assert faulty.classified == 96 and faulty.errored == 0
    expected = prediction_rows(visible_rows(s3_upstream, f"{PREFIX}/predict-clean"))
    assert prediction_rows(visible_rows(s3_upstream, f"{PREFIX}/predict-faulty")) == expected
    assert len(expected) == 96
    # Faults of every kind really happened, on the image reads and on the rest (the model, listing,
    # lease, records, Parquet files, commit: some 55 requests, so one of them is all but certain).
    assert all(proxy.faults[kind] > 0 for kind in FAULT_KINDS), proxy.faults
    assert any(record.fault for record in proxy.records("GET", rf"/{PREFIX}/images/"))
    assert any(record.fault for record in proxy.records() if f"/{PREFIX}/images/" not in record.target)
    assert [record["status"] for record in run_records(s3_upstream, f"{PREFIX}/predict-faulty")] == ["succeeded"]
    assert not [key for key in keys_under(s3_upstream, f"{PREFIX}/predict-faulty/") if "_staging" in key or key.endswith("_lock")]


def test_training_through_faults_finishes_with_every_epoch_and_its_artifact(
    ray_session, s3_upstream, bucket_inputs, proxy, record_property
):
    # The suite's Ray workers have AWS_ENDPOINT_URL=moto in their environment: the proxy reaches them
    # only through the config, which the assertions on the proxy's log check.
    output_dir = f"s3://{TEST_BUCKET}/{PREFIX}/train"
    overrides = tiny_job_overrides(bucket_inputs["images"], output_dir, workers=1, epochs=2)
    config = load_job_config(None, [*overrides, f"storage.endpoint_url={proxy.url}"])
    proxy.fail(0.1, kinds=FAULT_KINDS, stall_seconds=0.5, seed=11)
    result = train.run(config)
    record_property("requests", proxy.requests)
    record_property("faults", dict(proxy.faults))
    assert [entry["epoch"] for entry in result.history] == [1, 2]
    assert result.artifact_uri == f"{output_dir}/model"
    assert read_metadata(result.artifact_uri, s3_upstream).data_summary["train_images"] == 72
    assert sum(proxy.faults.values()) > 0, proxy.faults
    # The decode tasks' image reads, and the worker's checkpoint and artifact uploads, all came through.
    assert len({record.target for record in proxy.records("GET", rf"/{PREFIX}/images/.*\.png$")}) == 96
    assert proxy.records("PUT", rf"/{PREFIX}/train/checkpoints/train/checkpoint_[^/]+/model\.keras")
    assert proxy.records("PUT", rf"/{PREFIX}/train/model/model\.keras")


# An endpoint down for longer than the retry budget.


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_an_endpoint_down_for_good_fails_the_command_naming_it(bucket_inputs, proxy, kind, capsys, record_property):
    proxy.endpoint_down(kinds=(kind,), stall_seconds=float("inf"))  # a stall is never answered
    arguments = ["predict", "--model", bucket_inputs["model"], "--input", bucket_inputs["images"],
                 "--output", f"s3://{TEST_BUCKET}/{PREFIX}/down-{kind}", "--set", f"storage.endpoint_url={proxy.url}",
                 *(f"--set=storage.{key}={value}" for key, value in GIVE_UP_QUICKLY.items())]  # fmt: skip
    code, error, seconds = ends_within(RUN_ENDS_WITHIN_S, lambda: main(arguments))
    record_property("seconds_to_fail", round(seconds, 1))
    assert error is None and code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("imgcls predict: error: ") and "\n" not in message and "Traceback" not in message
    assert proxy.url in message and "storage.max_attempts=2" in message
    assert proxy.faults[kind] >= 2 and proxy.forwarded == 0


def test_image_reads_failing_for_good_fail_the_run_with_no_visible_rows(s3_upstream, bucket_inputs, proxy, record_property):
    """The endpoint fails under the image reads only, after the run has taken the lease and written
    its record: the run stops (not a row per image saying unreadable), marked failed, output unchanged."""
    output = f"{PREFIX}/reads-down"
    config = PredictConfig(model=bucket_inputs["model"], input=bucket_inputs["images"], output=f"s3://{TEST_BUCKET}/{output}",
                           storage={"endpoint_url": proxy.url, **GIVE_UP_QUICKLY})  # fmt: skip
    proxy.endpoint_down(kinds=("slowdown",), methods=frozenset({"GET"}), target_pattern=rf"^/{TEST_BUCKET}/{PREFIX}/images/")
    _, error, seconds = ends_within(RUN_ENDS_WITHIN_S, lambda: predict.run(config))
    record_property("seconds_to_fail", round(seconds, 1))
    assert isinstance(error, StorageError), repr(error)
    assert proxy.url in str(error) and f"s3://{TEST_BUCKET}/{PREFIX}/images/" in str(error)
    assert proxy.faults["slowdown"] >= 2
    assert visible_parquet(s3_upstream, output) == []
    [record] = run_records(s3_upstream, output)
    assert record["status"] == "failed" and proxy.url in record["error"]
    assert f"{output}/_lock" not in keys_under(s3_upstream, output)
    # Once the endpoint is back, the same command simply runs again: every image once.
    proxy.heal()
    summary = predict.run(config)
    assert summary.classified == 96 and len(prediction_rows(visible_rows(s3_upstream, output))) == 96


def test_training_fails_naming_the_endpoint_when_decode_tasks_cannot_read(ray_session, bucket_inputs, proxy, record_property):
    """Raised inside Ray Data decode tasks, the error reaches the driver wrapped by Ray: it comes out
    as the StorageError it was, instead of every image skipped as unreadable."""
    overrides = tiny_job_overrides(bucket_inputs["images"], f"s3://{TEST_BUCKET}/{PREFIX}/train-down", epochs=1)
    config = load_job_config(None, [*overrides, f"storage.endpoint_url={proxy.url}",
                                    *(f"storage.{key}={value}" for key, value in GIVE_UP_QUICKLY.items())])  # fmt: skip
    proxy.endpoint_down(kinds=("slowdown",), methods=frozenset({"GET"}), target_pattern=rf"^/{TEST_BUCKET}/{PREFIX}/images/")
    _, error, seconds = ends_within(RUN_ENDS_WITHIN_S, lambda: train.run(config))
    record_property("seconds_to_fail", round(seconds, 1))
    assert isinstance(error, StorageError), repr(error)
    assert proxy.url in str(error) and "storage.max_attempts=2" in str(error)
    assert proxy.faults["slowdown"] >= 2


def test_training_fails_naming_the_endpoint_when_ray_train_cannot_reach_its_checkpoints(ray_session, bucket_inputs, proxy):
    """Ray Train reads and writes checkpoints itself, with the filesystem it was given: the failure
    reaches the driver as Ray's error around pyarrow's, and comes out as a StorageError naming the endpoint."""
    overrides = tiny_job_overrides(bucket_inputs["images"], f"s3://{TEST_BUCKET}/{PREFIX}/train-no-checkpoints", epochs=1)
    config = load_job_config(None, [*overrides, f"storage.endpoint_url={proxy.url}",
                                    *(f"storage.{key}={value}" for key, value in GIVE_UP_QUICKLY.items())])  # fmt: skip
    proxy.endpoint_down(kinds=("slowdown",), target_pattern=r"/checkpoints/train/checkpoint_manager_snapshot\.json")
    _, error, _ = ends_within(RUN_ENDS_WITHIN_S, lambda: train.run(config))
    assert isinstance(error, StorageError), repr(error)
    assert proxy.url in str(error) and "checkpoints" in str(error) and "storage.max_attempts=2" in str(error)
    assert proxy.faults["slowdown"] >= 2


def test_a_user_error_on_a_ray_train_worker_comes_out_whole():
    """Ray Train's message holds only a snippet of each worker's traceback, cut in the middle when
    long; the worker's exception itself travels with it."""
    from ray.train import WorkerGroupError

    from imgcls.errors import user_errors_from_ray

    failure = StorageError("Cannot write s3://bucket/run/model/model.keras (endpoint http://minio:9000): SlowDown")
    with pytest.raises(StorageError) as raised, user_errors_from_ray():
        raise WorkerGroupError("[Rank 0 Error Snippet]: ... (Output truncated) ...\ngeError: Cannot wri", {0: failure})
    assert raised.value is failure
