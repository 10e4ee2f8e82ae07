"""Transfer learning: backbones, their weights (file, S3, ImageNet offline), the two-phase
fine-tuning schedule through real training, and warm starts from an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_BUCKET, tiny_job_overrides

from imgcls.config import BACKBONES, ModelConfig, load_job_config
from imgcls.errors import ConfigError, UserError

BACKBONE_SIZE = 32


def _backbone_weights_file(name: str, path: Path) -> Path:
    """A weights file for `name` without its top, as a user would save one: random but distinct weights."""
    import keras

    from imgcls.modeling.backbones import create_backbone

    keras.utils.set_random_seed(123)
    backbone = create_backbone(name, (BACKBONE_SIZE, BACKBONE_SIZE), None)
    backbone.save_weights(path)
    return path


def _backbone_weights(model) -> dict[str, np.ndarray]:
    from imgcls.modeling.backbones import backbone_of

    return {weight.path: np.array(weight.numpy()) for weight in backbone_of(model).weights}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_builds_with_its_preprocessing_and_loads_safely(name, tmp_path):
    """Raw 0-255 grey pixels in, probabilities out; saved models load in safe mode with the same output."""
    import keras

    from imgcls.modeling.models import create_model

    model = create_model(ModelConfig(name=name, dense_units=[]), (BACKBONE_SIZE, BACKBONE_SIZE), 1, 3)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, BACKBONE_SIZE, BACKBONE_SIZE, 1)).astype("float32")
    probabilities = model(pixels).numpy()
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    if name in ("MobileNetV3Small", "ResNet50"):  # ResNet50 carries imgcls' own preprocessing layer
        model.save(tmp_path / "model.keras")
        loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
        np.testing.assert_allclose(loaded(pixels).numpy(), probabilities, atol=1e-6)


def test_resnet50_preprocessing_is_imagenet_caffe_style():
    import keras

    from imgcls.modeling.backbones import CaffePreprocessing

    rgb = np.array([[[[10.0, 20.0, 30.0]]]], dtype="float32")
    expected = keras.applications.resnet50.preprocess_input(rgb.copy())
    np.testing.assert_allclose(CaffePreprocessing()(rgb).numpy(), expected, atol=1e-4)


def test_backbone_weights_load_from_a_local_file_and_from_s3(s3_endpoint, tmp_path):
    import boto3

    from imgcls.modeling.backbones import create_backbone, load_pretrained_model

    name = "MobileNetV3Small"
    weights_file = _backbone_weights_file(name, tmp_path / "mobilenet_v3_small_notop.weights.h5")
    import keras

    keras.utils.set_random_seed(123)
    expected = {w.path: np.array(w.numpy()) for w in create_backbone(name, (BACKBONE_SIZE, BACKBONE_SIZE), None).weights}
    key = "weights/mobilenet_v3_small_notop.weights.h5"
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(weights_file), TEST_BUCKET, key)

    for source in (str(weights_file), f"s3://{TEST_BUCKET}/{key}"):
        keras.utils.set_random_seed(999)  # a different random start, so only the file can make them equal
        model = load_pretrained_model(
            ModelConfig(name=name, weights=source), (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2, None
        )
        loaded = _backbone_weights(model)
        assert loaded.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(loaded[path], value, err_msg=f"{source}: {path}")


def test_a_missing_or_mismatched_weights_file_is_a_config_error(tmp_path):
    from imgcls.modeling.backbones import load_pretrained_model

    with pytest.raises(ConfigError, match="no weights file"):
        load_pretrained_model(ModelConfig(name="MobileNetV3Small", weights=str(tmp_path / "absent.weights.h5")),
                              (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2, None)  # fmt: skip
    other = _backbone_weights_file("MobileNetV3Small", tmp_path / "small.weights.h5")
    with pytest.raises(ConfigError, match="does not fit EfficientNetB0"):
        load_pretrained_model(ModelConfig(name="EfficientNetB0", weights=str(other)), (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2, None)


def test_imagenet_weights_offline_give_a_clear_message(monkeypatch, tmp_path):
    """The real Keras download path, made to fail the way an offline machine fails: an empty Keras
    cache and an HTTPS proxy that refuses connections."""
    from imgcls.modeling.backbones import load_pretrained_model

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(UserError) as raised:
        load_pretrained_model(ModelConfig(name="MobileNetV3Small"), (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2, None)
    message = str(raised.value)
    assert "Could not download the ImageNet weights for MobileNetV3Small" in message
    assert "model.weights" in message and "save_weights" in message


def test_imagenet_offline_exits_2_from_the_train_command(ray_session, pattern_dataset, monkeypatch, tmp_path, capsys):
    from imgcls.cli import main

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    overrides = tiny_job_overrides(pattern_dataset, tmp_path / "run", epochs=1)
    overrides += ["model.name=MobileNetV3Small", f"data.image_size=[{BACKBONE_SIZE}, {BACKBONE_SIZE}]"]
    arguments = ["train", "--config", str(_empty_config(tmp_path))]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "Could not download the ImageNet weights" in error and "Traceback" not in error


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def _checkpoints_by_epoch(output_dir: Path) -> dict[int, Path]:
    found = {}
    for state in (output_dir / "checkpoints" / "train").glob("checkpoint_*/state.json"):
        found[json.loads(state.read_text())["epoch"]] = state.parent
    return found


def test_two_phase_finetuning_freezes_then_unfreezes_exactly_the_top_layers(ray_session, pattern_dataset, tmp_path):
    """Epoch 1 trains the head only; epoch 2 also the top backbone layers; BatchNorm never changes."""
    import keras

    from imgcls import train
    from imgcls.modeling.backbones import backbone_of
    from imgcls.modeling.initial_weights import prepare_initial_weights
    from imgcls.modeling.models import create_model

    name, unfreeze_layers = "MobileNetV3Small", 12
    weights_file = _backbone_weights_file(name, tmp_path / "backbone.weights.h5")
    overrides = tiny_job_overrides(pattern_dataset, tmp_path / "run", epochs=2) + [
        f"model.name={name}", f"model.weights={weights_file}", "model.dense_units=[]",
        f"data.image_size=[{BACKBONE_SIZE}, {BACKBONE_SIZE}]", "data.channels=3",
        "finetune.freeze_epochs=1", f"finetune.unfreeze_layers={unfreeze_layers}", "finetune.learning_rate=0.001",
        "train.learning_rate=0.01", "train.checkpoint_every_epochs=1",
    ]  # fmt: skip
    config = load_job_config(None, overrides)
    result = train.run(config)
    assert [entry["learning_rate"] for entry in result.history] == pytest.approx([0.01, 0.001])

    # The starting point is what the driver prepared: the file's backbone and a seeded new head.
    start = create_model(config.model, (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2)
    class_names = json.loads((Path(result.artifact_uri) / "metadata.json").read_text())["class_names"]
    start.set_weights(prepare_initial_weights(config, class_names))
    checkpoints = _checkpoints_by_epoch(tmp_path / "run")
    after = {
        epoch: keras.saving.load_model(checkpoints[epoch] / "model.keras", safe_mode=True, compile=False)
        for epoch in (1, 2)
    }

    def changed_weights(before, later, layer_filter) -> set[str]:
        names = set()
        for layer_before, layer_later in zip(before.layers, later.layers):
            for weight_before, weight_later in zip(layer_before.weights, layer_later.weights):
                if layer_filter(layer_before) and not np.array_equal(weight_before.numpy(), weight_later.numpy()):
                    names.add(weight_before.path)
        return names

    def everything(layer):
        return True

    head = start.get_layer("predictions")
    assert not np.array_equal(head.get_weights()[0], after[1].get_layer("predictions").get_weights()[0])
    # Phase 1: not one backbone weight moved, BatchNorm statistics included.
    assert changed_weights(backbone_of(start), backbone_of(after[1]), everything) == set()
    # Phase 2: exactly the weights of the top layers that are not BatchNorm.
    layers = backbone_of(start).layers
    expected = {
        weight.path
        for layer in layers[len(layers) - unfreeze_layers :]
        if not isinstance(layer, keras.layers.BatchNormalization)
        for weight in layer.weights
    }
    assert expected, "the top layers chosen for the test must hold weights"
    # The checkpoints keep each phase's trainable flags: phase 1 nothing, phase 2 exactly those.
    assert backbone_of(after[1]).trainable_weights == []
    assert {weight.path for weight in backbone_of(after[2]).trainable_weights} == expected
    # Only those moved (a weight whose gradient was exactly zero, e.g. behind a dead ReLU, may stay).
    moved = changed_weights(backbone_of(after[1]), backbone_of(after[2]), everything)
    assert moved <= expected and len(moved) >= len(expected) // 2, (moved, expected)
    batch_norm_moved = changed_weights(
        backbone_of(start), backbone_of(after[2]), lambda layer: isinstance(layer, keras.layers.BatchNormalization)
    )
    assert batch_norm_moved == set()


def test_warm_start_copies_the_body_and_makes_a_new_head_for_new_classes(trained_one_worker, pattern_dataset, tmp_path):
    from imgcls.modeling.artifact import load_artifact
    from imgcls.modeling.initial_weights import prepare_initial_weights
    from imgcls.modeling.models import create_model

    result, _ = trained_one_worker
    source, metadata = load_artifact(result.artifact_uri)
    overrides = tiny_job_overrides(pattern_dataset, tmp_path / "warm") + [f"model.init_from={result.artifact_uri}"]
    config = load_job_config(None, overrides)

    def start_model(class_names):
        model = create_model(config.model, tuple(config.data.image_size), config.data.channels, len(class_names))
        model.set_weights(prepare_initial_weights(config, class_names))
        return model

    same = start_model(metadata.class_names)
    for layer in source.layers:
        for expected, actual in zip(layer.get_weights(), same.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(actual, expected)

    three_classes = start_model(["a", "b", "c"])
    for layer_name in ("conv", "dense"):
        for expected, actual in zip(source.get_layer(layer_name).get_weights(), three_classes.get_layer(layer_name).get_weights()):
            np.testing.assert_array_equal(actual, expected)
    assert three_classes.get_layer("predictions").get_weights()[0].shape == (128, 3)

    deeper = load_job_config(None, overrides + ["model.name=cnn"])
    with pytest.raises(ConfigError, match="does not match"):
        prepare_initial_weights(deeper, metadata.class_names)
    resized = load_job_config(None, overrides + ["data.image_size=[24, 24]"])
    with pytest.raises(ConfigError, match="trained on"):
        prepare_initial_weights(resized, metadata.class_names)


def test_backbone_configs_are_checked():
    with pytest.raises(ConfigError, match="at least"):
        load_job_config(None, ["data.train=x", "model.name=ResNet50", "data.image_size=[16, 16]"])
    with pytest.raises(ConfigError, match="finetune.freeze_epochs applies to backbones"):
        load_job_config(None, ["data.train=x", "finetune.freeze_epochs=2"])
    with pytest.raises(ConfigError, match="unfreeze_layers"):
        load_job_config(None, ["data.train=x", "model.name=ResNet50", "data.image_size=[32, 32]", "finetune.unfreeze_layers=0"])


def test_backbones_from_scratch_learn_batchnorm_statistics_at_the_configured_momentum():
    """MobileNetV3's own BatchNorm momentum (0.999) would leave a small from-scratch run validating
    at chance; pretrained backbones keep their layers untouched (they stay in inference mode)."""
    import keras

    from imgcls.modeling.backbones import backbone_of
    from imgcls.modeling.models import create_model

    def momenta(weights: str) -> set[float]:
        model = create_model(ModelConfig(name="MobileNetV3Small", weights=weights), (BACKBONE_SIZE, BACKBONE_SIZE), 3, 2)
        return {
            layer.momentum for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)
        }

    assert momenta("none") == {0.9}
    assert momenta("imagenet") == {0.999}
