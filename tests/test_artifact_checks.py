"""load_artifact refuses a model that does not fit its metadata, bad metadata and a damaged model file,
with a UserError that names the problem: no model may silently predict garbage. Real Keras models,
built and saved here; no Ray."""

import json
import zipfile

import keras
import numpy as np
import pytest

from imgcls.modeling.artifact import METADATA_FILE, MODEL_FILE, load_artifact, read_metadata, save_artifact
from imgcls.errors import UserError

TEN_CLASSES = [f"class{index}" for index in range(10)]


def tiny_model(outputs: int, size=(16, 16), channels: int = 3, extra_output: bool = False) -> keras.Model:
    """Input -> Rescaling -> Conv2D -> Flatten -> Dense(outputs); a None size gives a fully convolutional
    body with global pooling, which takes any image size."""
    inputs = keras.Input(shape=(*size, channels), name="image")
    features = keras.layers.Rescaling(1.0 / 255)(inputs)
    features = keras.layers.Conv2D(4, 3, activation="relu")(features)
    if None in size:
        features = keras.layers.GlobalAveragePooling2D()(features)
    else:
        features = keras.layers.Flatten()(features)
    activation = "sigmoid" if outputs == 1 else "softmax"
    predictions = keras.layers.Dense(outputs, activation=activation, name="predictions")(features)
    if extra_output:
        return keras.Model(inputs, [predictions, keras.layers.Dense(2, name="extra")(features)])
    return keras.Model(inputs, predictions)


def fields(class_names, image_size=(16, 16), channels=3, task=None):
    return {
        "class_names": class_names,
        "image_size": image_size,
        "channels": channels,
        "task": task or ("binary" if len(class_names) == 2 else "multiclass"),
        "model_name": "seed_cnn",
    }


def saved(tmp_path, model, metadata_fields) -> str:
    uri = str(tmp_path / "model")
    save_artifact(model, metadata_fields, uri)
    return uri


def edit_metadata(uri: str, **changes) -> None:
    path = f"{uri}/{METADATA_FILE}"
    with open(path) as handle:
        metadata = json.load(handle)
    metadata.update(changes)
    with open(path, "w") as handle:
        json.dump(metadata, handle)


@pytest.fixture(scope="module")
def three_class_artifact(tmp_path_factory):
    """One good multiclass artifact; tests copy it before editing it."""
    root = tmp_path_factory.mktemp("three")
    return saved(root, tiny_model(3), fields(["a", "b", "c"]))


@pytest.fixture
def artifact_copy(three_class_artifact, tmp_path):
    import shutil

    destination = tmp_path / "copy"
    shutil.copytree(three_class_artifact, destination)
    return str(destination)


def test_a_matching_artifact_loads_and_predicts(three_class_artifact, tmp_path):
    model, metadata = load_artifact(three_class_artifact)
    assert metadata.class_names == ["a", "b", "c"]
    probabilities = model.predict_on_batch(np.zeros((2, 16, 16, 3), np.float32))
    assert probabilities.shape == (2, 3)
    binary_uri = saved(tmp_path, tiny_model(1), fields(["cat", "dog"]))
    binary, binary_metadata = load_artifact(binary_uri)
    assert binary_metadata.task == "binary" and binary.outputs[0].shape[-1] == 1


def test_a_none_spatial_dimension_accepts_the_metadata_size(tmp_path):
    uri = saved(tmp_path, tiny_model(3, size=(None, None)), fields(["a", "b", "c"], image_size=(24, 40)))
    model, _ = load_artifact(uri)
    assert model.predict_on_batch(np.zeros((1, 24, 40, 3), np.float32)).shape == (1, 3)


def test_output_width_must_match_the_class_names(tmp_path):
    uri = saved(tmp_path, tiny_model(3), fields(TEN_CLASSES))
    with pytest.raises(UserError, match=r"output of shape \(None, 3\).*multiclass with 10 class names.*\(None, 10\)"):
        load_artifact(uri)


def test_binary_metadata_on_a_ten_output_model_is_refused(tmp_path):
    uri = saved(tmp_path, tiny_model(10), fields(["cat", "dog"], task="binary"))
    with pytest.raises(UserError, match=r"output of shape \(None, 10\).*task binary.*\(None, 1\)"):
        load_artifact(uri)


def test_a_two_unit_softmax_is_not_a_binary_model(tmp_path):
    uri = saved(tmp_path, tiny_model(2), fields(["cat", "dog"], task="binary"))
    with pytest.raises(UserError, match=r"\(None, 2\).*needs \(None, 1\)"):
        load_artifact(uri)


def test_input_size_must_match_image_size(tmp_path):
    uri = saved(tmp_path, tiny_model(3, size=(32, 32)), fields(["a", "b", "c"], image_size=(16, 16)))
    with pytest.raises(UserError, match=r"input of shape \(None, 32, 32, 3\).*image_size \[16, 16\].*\(None, 16, 16, 3\)"):
        load_artifact(uri)


def test_input_channels_must_match_channels(tmp_path):
    uri = saved(tmp_path, tiny_model(3, channels=1), fields(["a", "b", "c"], channels=3))
    with pytest.raises(UserError, match=r"input of shape \(None, 16, 16, 1\).*3 channel\(s\)"):
        load_artifact(uri)


def test_a_model_with_two_outputs_is_refused(tmp_path):
    uri = saved(tmp_path, tiny_model(3, extra_output=True), fields(["a", "b", "c"]))
    with pytest.raises(UserError, match="has 2 outputs"):
        load_artifact(uri)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"class_names": ["a", "b", "a"]}, r"class_names: class names must be unique, \[\"a\"\] repeated"),
        ({"class_names": []}, r"class_names: must list at least one class name, got \[\]"),
        ({"class_names": ["a", "", "c"]}, r"class_names: every class name must be a non-empty string"),
        ({"class_names": ["a", 7, "c"]}, r"class_names\.1: Input should be a valid string, got 7"),
        ({"image_size": [0, 0]}, r"image_size: each side must be between 1 and 4096 pixels, got \[0, 0\]"),
        ({"image_size": [16, 5000]}, r"image_size: each side must be between 1 and 4096 pixels, got \[16, 5000\]"),
        ({"channels": 2}, r"channels: must be 1 \(greyscale\) or 3 \(RGB\), got 2"),
        ({"task": "binary"}, r"task: binary needs exactly 2 class names, got 3"),
        ({"task": "multiclass", "class_names": ["only"]}, r"task: multiclass needs at least 2 class names, got 1"),
    ],
    ids=["duplicate names", "no names", "empty name", "name not a string", "zero size", "huge size",
         "two channels", "binary with three names", "multiclass with one name"],  # fmt: skip
)
def test_bad_metadata_names_the_field(artifact_copy, changes, message):
    edit_metadata(artifact_copy, **changes)
    for load in (read_metadata, load_artifact):
        with pytest.raises(UserError, match=message) as caught:
            load(artifact_copy)
        text = str(caught.value)
        assert text.startswith(f"{artifact_copy}/{METADATA_FILE} is not valid imgcls artifact metadata: ")
        # Pydantic's own dump (title line, input_value=..., documentation links) stays out of it.
        assert "validation error for" not in text and "input_value" not in text and "errors.pydantic.dev" not in text


def test_a_long_bad_value_is_not_echoed_in_full(artifact_copy):
    edit_metadata(artifact_copy, class_names=["x" * 100_000, "x" * 100_000], image_size=["y" * 100_000, 3])
    with pytest.raises(UserError) as caught:
        read_metadata(artifact_copy)
    text = str(caught.value)
    assert "class names must be unique" in text and "image_size.0" in text
    assert len(text) < 1000


def test_metadata_that_is_not_json_is_a_user_error(artifact_copy):
    with open(f"{artifact_copy}/{METADATA_FILE}", "w") as handle:
        handle.write("{not json")
    with pytest.raises(UserError, match="not a JSON document"):
        read_metadata(artifact_copy)


def test_a_truncated_model_file_is_damaged_not_missing(artifact_copy):
    model_file = f"{artifact_copy}/{MODEL_FILE}"
    with open(model_file, "rb") as handle:
        data = handle.read()
    with open(model_file, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"^the model file {artifact_copy}/{MODEL_FILE} is damaged \(not a zip archive") as caught:
        load_artifact(artifact_copy)
    assert "not found" not in str(caught.value).lower()


def test_a_zip_with_corrupt_contents_is_damaged(artifact_copy, tmp_path):
    model_file = f"{artifact_copy}/{MODEL_FILE}"
    rebuilt = tmp_path / "rebuilt.keras"
    with zipfile.ZipFile(model_file) as source, zipfile.ZipFile(rebuilt, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename.endswith(".json"):
                content = b"{ this is not the config"
            target.writestr(item, content)
    with open(model_file, "wb") as handle:
        handle.write(rebuilt.read_bytes())
    with pytest.raises(UserError, match=r"^the model file .* is damaged \("):
        load_artifact(artifact_copy)


def test_a_file_that_is_not_a_zip_at_all_is_damaged(artifact_copy):
    with open(f"{artifact_copy}/{MODEL_FILE}", "w") as handle:
        handle.write("<html>403 Forbidden</html>")
    with pytest.raises(UserError, match=r"is damaged \(not a zip archive: 26 bytes"):
        load_artifact(artifact_copy)


def doubled(values):
    return values * 2.0


def model_with_lambda(function) -> keras.Model:
    inputs = keras.Input(shape=(16, 16, 3))
    features = keras.layers.Flatten()(keras.layers.Lambda(function)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(features))


def test_a_safe_mode_refusal_is_a_user_error_that_never_suggests_turning_safe_mode_off(tmp_path):
    uri = saved(tmp_path, model_with_lambda(lambda values: values * 2.0), fields(["a", "b", "c"]))
    with pytest.raises(UserError, match="safe mode refuses to run") as caught:
        load_artifact(uri)
    assert "safe_mode=False" not in str(caught.value) and "damaged" not in str(caught.value)


def test_a_model_naming_unknown_code_is_refused_with_the_innermost_reason(tmp_path):
    # A named function is not a safe-mode refusal: Keras cannot find it here, so the file is unusable.
    uri = saved(tmp_path, model_with_lambda(doubled), fields(["a", "b", "c"]))
    with pytest.raises(UserError, match=r"is damaged \(TypeError: Could not locate function 'doubled'"):
        load_artifact(uri)
