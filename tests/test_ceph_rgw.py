"""The bucket round trip against a second, real S3 implementation: Ceph's RADOS Gateway (started by
the suite, tests/ceph_rgw.py). The suite's Ray and environment point at moto's server, so every
call here names the gateway through config (`storage.endpoint_url`), as a user of Ceph would.

Ceph 16 differs from moto where imgcls must cope with it: uploads with the AWS SDKs' default
checksums are refused (imgcls sets `when_required` itself: nothing here sets it), If-Match wants
the ETag unquoted, and CompleteMultipartUpload answers an empty ETag."""

import json
import time

import boto3
import pyarrow.dataset as pads
import pytest
from conftest import TEST_BUCKET, tiny_job_overrides, upload_tree

from imgcls import predict, train
from imgcls.config import PredictConfig, load_job_config
from imgcls.errors import OutputBusyError
from imgcls.modeling.artifact import read_metadata
from imgcls.platform import storage
from imgcls.platform.output_lease import LeaseRecord, OutputLease

RUN = "runs/from-ceph"


@pytest.fixture(scope="module", autouse=True)
def checksum_settings_unset():
    """imgcls must set the checksum settings Ceph needs by itself: start without them, and restore
    the suite's environment afterwards (imgcls leaves them set in this process)."""
    with pytest.MonkeyPatch.context() as patch:
        for variable in storage.S3_COMPATIBLE_CHECKSUMS:
            patch.delenv(variable, raising=False)
        yield


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def ceph_dataset(ceph_rgw_endpoint, ray_session, pattern_dataset) -> str:
    upload_tree(pattern_dataset, TEST_BUCKET, "patterns/train", endpoint_url=ceph_rgw_endpoint)
    return f"s3://{TEST_BUCKET}/patterns/train"


@pytest.fixture(scope="module")
def ceph_run(ceph_rgw_endpoint, ceph_dataset):
    """One training run from the gateway's bucket, checkpoints and artifact written back to it."""
    overrides = tiny_job_overrides(ceph_dataset, f"s3://{TEST_BUCKET}/{RUN}", workers=1, epochs=2)
    config = load_job_config(None, [*overrides, f"storage.endpoint_url={ceph_rgw_endpoint}"])
    return train.run(config)


def test_training_from_ceph_writes_checkpoints_and_artifact_to_it(ceph_run, ceph_rgw_endpoint):
    assert ceph_run.artifact_uri == f"s3://{TEST_BUCKET}/{RUN}/model"
    keys = bucket_keys(ceph_rgw_endpoint, f"{RUN}/")
    assert f"{RUN}/model/model.keras" in keys and f"{RUN}/model/metadata.json" in keys
    assert f"{RUN}/config.yaml" in keys and f"{RUN}/augmentation_samples.png" in keys
    assert any(key.startswith(f"{RUN}/checkpoints/train/checkpoint_") for key in keys)
    metadata = read_metadata(ceph_run.artifact_uri, ceph_rgw_endpoint)
    assert metadata.class_names == ["horizontal", "vertical"]
    assert metadata.data_summary["train_images"] == 72


@pytest.fixture(scope="module")
def ceph_predictions(ceph_run, ceph_rgw_endpoint, ceph_dataset) -> tuple[dict, predict.PredictSummary]:
    """Bucket to bucket, in this process (a small run's default; test_s3.py covers the actor pool,
    and the training workers cover writing to the gateway from other processes)."""
    settings = {"model": ceph_run.artifact_uri, "input": ceph_dataset, "output": f"s3://{TEST_BUCKET}/predictions/ceph",
                "storage": {"endpoint_url": ceph_rgw_endpoint}}  # fmt: skip
    return settings, predict.run(PredictConfig(**settings))


def prediction_rows(settings: dict) -> list[dict]:
    location = storage.resolve(settings["output"], settings["storage"]["endpoint_url"])
    return pads.dataset(location.path, filesystem=location.filesystem, format="parquet").to_table().to_pylist()


def test_predict_from_ceph_to_ceph_equals_a_local_run(ceph_predictions, ceph_rgw_endpoint, pattern_dataset, tmp_path):
    settings, summary = ceph_predictions
    assert summary.images_listed == 96 and summary.classified == 96 and summary.errored == 0
    left_over = [key for key in bucket_keys(ceph_rgw_endpoint, "predictions/ceph/") if "_staging" in key or key.endswith("_lock")]
    assert not left_over
    predict.run(PredictConfig(model=settings["model"], input=str(pattern_dataset), output=str(tmp_path / "p"),
                              storage=settings["storage"]))  # fmt: skip
    local = pads.dataset(str(tmp_path / "p"), format="parquet").to_table().to_pylist()
    by_name = {row["path"].split("/train/", 1)[1]: row for row in local}
    remote = prediction_rows(settings)
    assert len(remote) == len(local) == 96
    for row in remote:
        twin = by_name[row["path"].split("/train/", 1)[1]]
        assert row["path"].startswith(f"s3://{TEST_BUCKET}/patterns/train/")
        assert (row["label"], row["top_k_labels"]) == (twin["label"], twin["top_k_labels"])
        assert row["score"] == pytest.approx(twin["score"], abs=1e-5)


def test_a_rerun_on_ceph_skips_every_image(ceph_predictions):
    settings, _ = ceph_predictions
    rerun = predict.run(PredictConfig(**settings))
    assert rerun.images_listed == 96 and rerun.already_done == 96 and rerun.classified == 0
    assert len(prediction_rows(settings)) == 96


def test_the_lease_on_ceph_is_a_conditional_put_renewed_and_taken_over(ceph_rgw_endpoint):
    # Renewal and takeover are PUTs with If-Match on the ETag read back: Ceph 16 matches only an
    # unquoted one, which a quoted ETag (as S3 returns it) would never be.
    output = storage.resolve(f"s3://{TEST_BUCKET}/lease-test/out", ceph_rgw_endpoint)
    client = storage.s3_client(ceph_rgw_endpoint)
    key = "lease-test/out/_lock"
    with OutputLease(output, "20260101T000000000Z-cephholder", ttl_s=30) as lease:
        with pytest.raises(OutputBusyError, match="cephholder"):
            OutputLease(output, "20260101T000000000Z-cephsecond", ttl_s=30).acquire()
        etag = client.head_object(Bucket=TEST_BUCKET, Key=key)["ETag"]
        assert lease._backend.renew()
        assert client.head_object(Bucket=TEST_BUCKET, Key=key)["ETag"] != etag
        lease.verify()
    assert "Contents" not in client.list_objects_v2(Bucket=TEST_BUCKET, Prefix=key)
    now = time.time()
    expired = LeaseRecord(run_id="20250101T000000000Z-expired0", host="elsewhere", pid=1, acquired_at=now - 90,
                          expires_at=now - 30, ttl_s=60)  # fmt: skip
    client.put_object(Bucket=TEST_BUCKET, Key=key, Body=expired.model_dump_json().encode())
    with OutputLease(output, "20260101T000000000Z-cephtakeover", ttl_s=30):
        body = client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
        assert json.loads(body)["run_id"] == "20260101T000000000Z-cephtakeover"
        # Another run takes the lease over unseen (this run's heartbeat has not noticed yet): this
        # run's release must leave that lease alone, though Ceph ignores If-Match on DELETE.
        newer = LeaseRecord(run_id="20260101T000000000Z-cephnewer0", host="elsewhere", pid=1, acquired_at=now,
                            expires_at=now + 60, ttl_s=60)  # fmt: skip
        client.put_object(Bucket=TEST_BUCKET, Key=key, Body=newer.model_dump_json().encode())
    body = client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
    assert json.loads(body)["run_id"] == "20260101T000000000Z-cephnewer0"
    client.delete_object(Bucket=TEST_BUCKET, Key=key)
