"""Real Ray Train runs on tiny learnable images: one and two Keras workers under MWMS."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_job_overrides

from imgcls import train
from imgcls.modeling.artifact import read_metadata
from imgcls.config import load_job_config
from imgcls.monitoring.profile import read_profile


def test_single_worker_learns_and_writes_the_artifact(trained_one_worker, pattern_dataset):
    result, output_dir = trained_one_worker
    history = result.history
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert result.metrics["val_accuracy"] >= 0.9  # two classes: chance is 0.5
    assert result.metrics["train_images"] == 72  # 96 images, a quarter held out
    assert all(entry["images_per_second"] > 0 for entry in history)

    metadata = read_metadata(result.artifact_uri)
    assert metadata.model_version == result.model_version
    assert metadata.class_names == ["horizontal", "vertical"]
    assert metadata.task == "binary" and metadata.image_size == (16, 16) and metadata.channels == 3
    assert metadata.data_summary["train_images"] == 72 and metadata.data_summary["val_images"] == 24
    assert metadata.config["data"]["train"] == str(pattern_dataset)
    saved_config = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved_config["train"]["epochs"] == 4
    assert pq.read_table(output_dir / "skipped_images.parquet").num_rows == 0
    assert json.loads((output_dir / "model" / "metadata.json").read_text())["metrics"]["epoch"] == 4
    # The reference profile bulk runs are compared with: the 24 validation images, by the final model.
    profile, arrays = read_profile(result.artifact_uri)
    assert profile.source == "validation" and profile.images == 24 and sum(profile.class_counts) == 24
    assert profile.class_names == ["horizontal", "vertical"] and profile.scalars["width"].quantiles.p50 == 16
    assert arrays is not None and arrays.projection.shape == (128, 32)


def test_two_workers_learn_and_keep_identical_weights(ray_session, pattern_dataset, tmp_path):
    config = load_job_config(None, tiny_job_overrides(pattern_dataset, tmp_path, workers=2))
    result = train.run(config)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.metrics["val_accuracy"] >= 0.9
    # Each worker trained on its own half of the data, 36 images each.
    assert result.metrics["train_images"] == 72
    checksums = result.metrics["weights_checksums"]
    assert len(checksums) == 2
    assert checksums[0] == checksums[1]
    assert read_profile(result.artifact_uri)[0].images == 24  # rank 0 profiles the whole validation split


def test_unreadable_training_images_are_skipped_and_listed(ray_session, pattern_dataset, tmp_path):
    import shutil

    data_root = tmp_path / "data"
    shutil.copytree(pattern_dataset, data_root)
    (data_root / "vertical" / "zero.png").write_bytes(b"")
    (data_root / "horizontal" / "noise.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    config = load_job_config(None, tiny_job_overrides(data_root, tmp_path / "out", epochs=1))
    result = train.run(config)
    skipped = pq.read_table(tmp_path / "out" / "skipped_images.parquet").to_pylist()
    assert sorted(row["path"].rsplit("/", 1)[1] for row in skipped) == ["noise.jpg", "zero.png"]
    assert all(row["error"] for row in skipped)
    metadata = read_metadata(result.artifact_uri)
    assert metadata.data_summary["skipped_images"] == 2
    assert metadata.data_summary["train_images"] + metadata.data_summary["val_images"] == 96


def test_a_class_with_no_readable_images_is_a_data_error(ray_session, tmp_path):
    from imgcls.errors import DataError

    from image_factory import write_pattern_dataset

    write_pattern_dataset(tmp_path / "data", per_class=4)
    (tmp_path / "data" / "bad").mkdir()
    for index in range(4):
        (tmp_path / "data" / "bad" / f"{index}.png").write_bytes(b"broken")
    config = load_job_config(None, tiny_job_overrides(tmp_path / "data", tmp_path / "out", epochs=1))
    with pytest.raises(DataError, match=r"\['bad'\] have no readable training images"):
        train.run(config)


def test_shard_cache_reshuffles_every_row_exactly_once_per_epoch():
    import numpy as np

    from imgcls.training.feed import ShardCache

    cache = ShardCache()
    images = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2, 1)
    labels = np.arange(10)
    for start in range(0, 10, 4):  # as Ray Data hands batches over during the first epoch
        cache.add({"image": images[start : start + 4], "label": labels[start : start + 4]})
    cache.finish()
    epochs = []
    for seed in (1, 2):
        batches = list(cache.batches(4, seed))
        assert [len(batch["label"]) for batch in batches] == [4, 4, 2]
        order = np.concatenate([batch["label"] for batch in batches])
        assert sorted(order.tolist()) == list(range(10))
        for batch in batches:  # images travel with their labels
            np.testing.assert_array_equal(batch["image"], images[batch["label"]])
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1]
