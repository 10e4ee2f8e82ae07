import keras
import numpy as np
import pytest

from imgcls.config import ModelConfig
from imgcls.models import create_loss, create_model, create_optimizer, task_for


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
    assert isinstance(create_loss(2), keras.losses.BinaryCrossentropy)
    assert isinstance(create_loss(5), keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(create_optimizer("adam", 1e-3), keras.optimizers.Adam)
    assert isinstance(create_optimizer("adamw", 1e-3), keras.optimizers.AdamW)
    sgd = create_optimizer("sgd", 1e-2)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
