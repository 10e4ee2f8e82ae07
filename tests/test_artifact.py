import json

import numpy as np
import pytest

from imgcls.modeling.artifact import METADATA_FILE, MODEL_FILE, load_artifact, read_metadata, save_artifact
from imgcls.config import ModelConfig
from imgcls.errors import UserError
from imgcls.modeling.models import create_model


def metadata_fields(class_names):
    return {
        "class_names": class_names,
        "image_size": (16, 16),
        "channels": 3,
        "task": "binary" if len(class_names) == 2 else "multiclass",
        "model_name": "seed_cnn",
    }


def test_round_trip_predicts_exactly_the_same(tmp_path):
    model = create_model(ModelConfig(), (16, 16), 3, num_classes=3)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)).astype(np.float32)
    before = model.predict_on_batch(pixels)
    metadata = save_artifact(model, metadata_fields(["a", "b", "c"]), str(tmp_path / "model"))
    loaded, loaded_metadata = load_artifact(str(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.predict_on_batch(pixels), before)
    assert loaded_metadata == metadata
    assert loaded_metadata.class_names == ["a", "b", "c"]
    assert (tmp_path / "model" / MODEL_FILE).is_file()


def test_model_version_is_unique_per_save(tmp_path):
    model = create_model(ModelConfig(), (16, 16), 3, num_classes=2)
    first = save_artifact(model, metadata_fields(["a", "b"]), str(tmp_path / "one"))
    second = save_artifact(model, metadata_fields(["a", "b"]), str(tmp_path / "two"))
    assert first.model_version != second.model_version
    assert read_metadata(str(tmp_path / "one")).model_version == first.model_version


def test_missing_or_broken_artifact_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="metadata.json is missing"):
        read_metadata(str(tmp_path))
    (tmp_path / METADATA_FILE).write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(UserError, match="not valid imgcls artifact metadata"):
        read_metadata(str(tmp_path))
