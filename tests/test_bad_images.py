"""One rule for bad images: decodable ones are used after conversion, undecodable ones are skipped
and reported once each, and nothing else is lost (through the real Ray Data pipeline)."""

from pathlib import Path

import pyarrow.dataset as pads
import pytest
from image_factory import BOMB_PIXEL_LIMIT, bad_image_corpus, write_pattern_dataset

from imgcls import predict
from imgcls.data import datasets, listing
from imgcls.config import PredictConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    write_pattern_dataset(root, per_class=5, size=24)
    kinds = bad_image_corpus(size=24)
    for kind, (name, payload, _) in kinds.items():
        (root / "horizontal" / name).write_bytes(payload)
    return root, kinds


def test_training_pipeline_uses_and_skips_exactly_the_right_files(ray_session, corpus):
    root, kinds = corpus
    images = listing.list_labelled(str(root))
    assert len(images.paths) == 10 + len(kinds)
    prepared = datasets.prepare_split(images, (16, 16), 3, BOMB_PIXEL_LIMIT, decode_batch_size=4, seed=0, split_name="train")
    expected_skipped = sorted(name for name, _, usable in kinds.values() if not usable)
    assert sorted(Path(row["path"]).name for row in prepared.skipped) == expected_skipped
    assert prepared.num_rows == 10 + sum(usable for _, _, usable in kinds.values())
    assert prepared.class_counts == {"horizontal": 5 + 8, "vertical": 5}


def test_prediction_reports_every_bad_file_as_one_error_row(ray_session, corpus, trained_one_worker, tmp_path):
    root, kinds = corpus
    result, _ = trained_one_worker
    summary = predict.run(
        PredictConfig(model=result.artifact_uri, input=str(root), output=str(tmp_path), max_image_pixels=BOMB_PIXEL_LIMIT)
    )
    rows = pads.dataset(str(tmp_path), format="parquet").to_table().to_pylist()
    assert len(rows) == summary.images_listed == 10 + len(kinds)
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"] is not None}
    assert sorted(errors) == sorted(name for name, _, usable in kinds.values() if not usable)
    assert "decompression bomb" in errors["bomb.png"] and "empty file" in errors["empty.png"]
    assert all(row["label"] is not None for row in rows if row["error"] is None)
