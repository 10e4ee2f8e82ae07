import keras
import numpy as np
import pytest

from imgcls.config import ModelConfig
from imgcls.modeling.losses import create_loss
from imgcls.modeling.models import create_model, create_optimizer, task_for


def test_seed_cnn_is_exactly_the_tutorial_network():
    model = create_model(ModelConfig(name="seed_cnn"), (64, 64), 3, num_classes=2)
    layers = [(type(layer).__name__, layer.output.shape[1:]) for layer in model.layers[1:]]
    assert layers == [
        ("Rescaling", (64, 64, 3)),
        ("Conv2D", (62, 62, 32)),
        ("MaxPooling2D", (31, 31, 32)),
        ("Flatten", (30752,)),
        ("Dense", (128,)),
        ("Dense", (1,)),
    ]
    conv, dense, output = model.get_layer("conv"), model.get_layer("dense"), model.get_layer("predictions")
    assert conv.filters == 32 and conv.kernel_size == (3, 3) and conv.activation.__name__ == "relu"
    assert model.get_layer("pool").pool_size == (2, 2)
    assert dense.activation.__name__ == "relu"
    assert output.activation.__name__ == "sigmoid"
    assert model.count_params() == 3_937_409


def test_seed_cnn_uses_softmax_for_more_than_two_classes():
    model = create_model(ModelConfig(), (16, 16), 1, num_classes=10)
    assert model.output.shape[1:] == (10,)
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    probabilities = model.predict_on_batch(np.full((2, 16, 16, 1), 255.0, np.float32))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_model_takes_raw_pixels():
    model = create_model(ModelConfig(), (16, 16), 3, num_classes=2)
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)


def test_losses_and_optimizers():
    assert task_for(2) == "binary" and task_for(3) == "multiclass"
    with pytest.raises(ValueError):
        task_for(1)
    # Binary: one sigmoid unit; multiclass: integer labels against a softmax.
    binary_loss = np.asarray(create_loss(2)(np.array([1, 0]), np.array([[0.9], [0.9]], np.float32)))
    np.testing.assert_allclose(binary_loss, [-np.log(0.9), -np.log(0.1)], rtol=1e-5)
    multiclass_loss = np.asarray(create_loss(3)(np.array([2]), np.array([[0.2, 0.3, 0.5]], np.float32)))
    np.testing.assert_allclose(multiclass_loss, [-np.log(0.5)], rtol=1e-5)
    assert isinstance(create_optimizer("adam", 1e-3), keras.optimizers.Adam)
    assert isinstance(create_optimizer("adamw", 1e-3), keras.optimizers.AdamW)
    sgd = create_optimizer("sgd", 1e-2)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9


def test_configurable_cnn_builds_the_blocks_it_is_given():
    config = ModelConfig(name="cnn", filters=[8, 16], convs_per_block=2, batch_norm=True, block_dropout=0.2,
                         head="global_average", dense_units=[32], dense_dropout=0.5)  # fmt: skip
    model = create_model(config, (32, 32), 3, num_classes=4)
    names = [layer.name for layer in model.layers]
    assert [name for name in names if name.endswith(("_conv1", "_conv2"))] == [
        "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2"
    ]  # fmt: skip
    assert model.get_layer("block2_conv2").filters == 16
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 4
    assert model.get_layer("block1_dropout").rate == 0.2
    assert isinstance(model.get_layer("global_pool"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("dense1").units == 32 and model.output.shape[1:] == (4,)
    flat = create_model(ModelConfig(name="cnn", filters=[8], head="flatten", batch_norm=False, pooling="average"),
                        (16, 16), 1, num_classes=2)  # fmt: skip
    assert isinstance(flat.get_layer("flatten"), keras.layers.Flatten)
    assert isinstance(flat.get_layer("block1_pool"), keras.layers.AveragePooling2D)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in flat.layers)


def test_class_weights_change_the_loss_on_an_imbalanced_set():
    from imgcls.modeling.losses import class_weight_vector

    counts = {"common": 90, "rare": 10}
    balanced = class_weight_vector("balanced", ["common", "rare"], counts)
    assert balanced == pytest.approx([100 / 180, 100 / 20])
    assert class_weight_vector({"rare": 3.0}, ["common", "rare"], counts) == [1.0, 3.0]
    with pytest.raises(ValueError, match="unknown class"):
        class_weight_vector({"other": 2.0}, ["common", "rare"], counts)
    labels = np.array([0] * 9 + [1], np.int32)
    probabilities = np.array([[0.8]] * 9 + [[0.3]], np.float32)  # P(class 1)
    plain = np.asarray(create_loss(2)(labels, probabilities))
    weighted = np.asarray(create_loss(2, class_weights=balanced)(labels, probabilities))
    np.testing.assert_allclose(weighted, plain * np.array([balanced[0]] * 9 + [balanced[1]]), rtol=1e-6)
    assert weighted.mean() != pytest.approx(plain.mean())


def test_label_smoothing_raises_the_loss_of_confident_right_answers():
    labels = np.array([0, 2], np.int32)
    probabilities = np.array([[0.98, 0.01, 0.01], [0.01, 0.01, 0.98]], np.float32)
    sharp = np.asarray(create_loss(3)(labels, probabilities))
    smooth = np.asarray(create_loss(3, label_smoothing=0.1)(labels, probabilities))
    assert (smooth > sharp).all()
