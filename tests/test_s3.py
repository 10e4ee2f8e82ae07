"""Everything through a real S3 API (moto's server on 127.0.0.1): training from a bucket, manifests,
checkpoints and artifacts in the bucket, bucket-to-bucket prediction, and no credential leaks."""

import csv
import io
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from conftest import TEST_ACCESS_KEY, TEST_BUCKET, TEST_SECRET_KEY, tiny_job_overrides, upload_tree

from imgcls import predict, train
from imgcls.platform import storage
from imgcls.modeling.artifact import read_metadata
from imgcls.config import PredictConfig, load_job_config
from imgcls.data.listing import list_images, list_labelled


def bucket_keys(prefix: str) -> list[str]:
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def bucket_dataset(ray_session, pattern_dataset):
    upload_tree(pattern_dataset, TEST_BUCKET, "patterns/train")
    return f"s3://{TEST_BUCKET}/patterns/train"


@pytest.fixture(scope="module")
def bucket_run(bucket_dataset, tmp_path_factory):
    """Train from the bucket, checkpoints and artifact written to the bucket; logs captured."""
    config = load_job_config(
        None, tiny_job_overrides(bucket_dataset, f"s3://{TEST_BUCKET}/runs/from-bucket", epochs=2)
    )
    return train.run(config)


def test_bucket_listing_matches_local(bucket_dataset, pattern_dataset):
    from_bucket = list_labelled(bucket_dataset)
    local = list_labelled(str(pattern_dataset))
    assert from_bucket.class_names == local.class_names
    assert [uri.split("/train/", 1)[1] for uri in from_bucket.paths] == [
        path.split("/train/", 1)[1] for path in local.paths
    ]
    assert from_bucket.labels == local.labels


def test_listing_pages_through_many_keys(ray_session):
    client = boto3.client("s3")
    for index in range(2300):  # more than two listing pages of 1,000
        client.put_object(Bucket=TEST_BUCKET, Key=f"many/{index:05d}.png", Body=b"")
    client.put_object(Bucket=TEST_BUCKET, Key="many/.hidden.png", Body=b"")
    client.put_object(Bucket=TEST_BUCKET, Key="many/readme.txt", Body=b"")
    listing = list_images(f"s3://{TEST_BUCKET}/many")
    assert len(listing.paths) == 2300 and listing.ignored == 2
    assert listing.paths[0] == f"s3://{TEST_BUCKET}/many/00000.png"


def test_training_from_a_bucket_writes_checkpoints_and_artifact_to_it(bucket_run):
    assert bucket_run.artifact_uri == f"s3://{TEST_BUCKET}/runs/from-bucket/model"
    keys = bucket_keys("runs/from-bucket/")
    assert "runs/from-bucket/model/model.keras" in keys and "runs/from-bucket/model/metadata.json" in keys
    assert "runs/from-bucket/config.yaml" in keys and "runs/from-bucket/augmentation_samples.png" in keys
    assert any(key.startswith("runs/from-bucket/checkpoints/train/checkpoint_") for key in keys)
    metadata = read_metadata(bucket_run.artifact_uri)
    assert metadata.class_names == ["horizontal", "vertical"]
    assert metadata.data_summary["train_images"] == 72


def test_training_from_a_manifest_in_the_bucket(ray_session, bucket_dataset, pattern_dataset, tmp_path):
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "label"])
    for path in sorted(pattern_dataset.rglob("*.png")):
        # Relative to the manifest's folder; the label deliberately differs from the folder name.
        relative = path.relative_to(pattern_dataset.parent).as_posix()
        writer.writerow([relative, "stripes_" + path.parent.name])
    boto3.client("s3").put_object(Bucket=TEST_BUCKET, Key="patterns/manifest.csv", Body=rows.getvalue().encode())
    manifest = f"s3://{TEST_BUCKET}/patterns/manifest.csv"
    labelled = list_labelled(manifest)
    assert labelled.class_names == ["stripes_horizontal", "stripes_vertical"]
    assert labelled.paths[0].startswith(f"s3://{TEST_BUCKET}/patterns/train/")
    result = train.run(load_job_config(None, tiny_job_overrides(manifest, tmp_path / "run", epochs=1)))
    assert read_metadata(result.artifact_uri).class_names == ["stripes_horizontal", "stripes_vertical"]
    assert result.metrics["train_images"] == 72


def test_predict_bucket_to_bucket_equals_local(bucket_run, bucket_dataset, pattern_dataset, tmp_path):
    # The bucket twice: through an actor pool (each actor loads the artifact from S3), and in this
    # process (the default for a small run: objects read on decode threads); the local twin in this
    # process too, committing in chunks of 40 (copied in file by file). The rows must agree.
    remote_runs = {}
    for name, placement in (("pool", "actor_pool"), ("in_process", "auto")):
        output = f"s3://{TEST_BUCKET}/predictions/{name}"
        summary = predict.run(
            PredictConfig(model=bucket_run.artifact_uri, input=bucket_dataset, output=output, placement=placement,
                          commit_every_images=40)  # fmt: skip
        )
        assert summary.images_listed == 96 and summary.errored == 0
        assert sorted({path.split("/")[1] for path in summary.files}) == ["chunk-00000", "chunk-00001", "chunk-00002"]
        location = storage.resolve(output)
        remote_runs[name] = pads.dataset(location.path, filesystem=location.filesystem, format="parquet").to_table()
        assert not [key for key in bucket_keys(f"predictions/{name}/") if "_staging" in key]
    predict.run(PredictConfig(model=bucket_run.artifact_uri, input=str(pattern_dataset), output=str(tmp_path / "p")))
    local = pads.dataset(str(tmp_path / "p"), format="parquet").to_table().to_pylist()
    by_name = {row["path"].split("/train/", 1)[1]: row for row in local}
    for name, remote in remote_runs.items():
        assert remote.num_rows == len(local) == 96, name
        for row in remote.to_pylist():
            twin = by_name[row["path"].split("/train/", 1)[1]]
            assert row["path"].startswith("s3://")
            assert (row["label"], row["top_k_labels"]) == (twin["label"], twin["top_k_labels"]), name
            assert row["score"] == pytest.approx(twin["score"], abs=1e-5), name


def test_credentials_never_reach_logs_or_written_files(bucket_run, capfd, caplog, tmp_path):
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text]
    client = boto3.client("s3")
    for key in bucket_keys("runs/") + bucket_keys("predictions/"):
        texts.append(client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read().decode("latin-1"))
    # The suite's Ray session logs: driver, workers, Ray Train and Ray Data (its own session folder:
    # /tmp/ray/session_latest may be another Ray's, started later on this machine).
    from imgcls.platform.ray_runtime import session_logs

    logs = Path(session_logs())
    assert logs.is_dir()
    for log in logs.rglob("*"):
        if log.is_file():
            texts.append(log.read_text(errors="replace"))
    for text in texts:
        assert TEST_SECRET_KEY not in text
        assert TEST_ACCESS_KEY not in text


def test_missing_bucket_prefix_is_a_clear_error(ray_session):
    from imgcls.errors import DataError

    with pytest.raises(DataError, match="Nothing found under"):
        list_images(f"s3://{TEST_BUCKET}/no/such/prefix")
    assert isinstance(storage.resolve(f"s3://{TEST_BUCKET}/x").filesystem, pafs.S3FileSystem)
