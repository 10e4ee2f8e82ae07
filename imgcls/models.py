"""Model builders. Every model takes raw uint8-range pixels: scaling happens inside the model."""

from __future__ import annotations

import keras

from imgcls.config import ModelConfig


def task_for(num_classes: int) -> str:
    """Two classes use one sigmoid unit (the tutorial's); more use a softmax over K units."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return "binary" if num_classes == 2 else "multiclass"


def classification_head(features, num_classes: int):
    if task_for(num_classes) == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="predictions")(features)
    return keras.layers.Dense(num_classes, activation="softmax", name="predictions")(features)


def create_seed_cnn(image_size: tuple[int, int], channels: int, num_classes: int) -> keras.Model:
    """The tutorial's network: Conv2D(32, 3x3, relu) -> MaxPool(2x2) -> Flatten -> Dense(128, relu) -> output."""
    inputs = keras.Input(shape=(*image_size, channels), name="image")
    rescaled = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    features = keras.layers.Conv2D(32, (3, 3), activation="relu", name="conv")(rescaled)
    features = keras.layers.MaxPooling2D((2, 2), name="pool")(features)
    features = keras.layers.Flatten(name="flatten")(features)
    features = keras.layers.Dense(128, activation="relu", name="dense")(features)
    outputs = classification_head(features, num_classes)
    return keras.Model(inputs, outputs, name="seed_cnn")


def create_model(config: ModelConfig, image_size: tuple[int, int], channels: int, num_classes: int) -> keras.Model:
    """Build the configured architecture (uncompiled)."""
    if config.name == "seed_cnn":
        return create_seed_cnn(tuple(image_size), channels, num_classes)
    raise ValueError(f"unknown model.name {config.name!r}")


def create_loss(num_classes: int) -> keras.losses.Loss:
    """Per-example losses (no reduction): the distributed step averages over the global batch itself."""
    if task_for(num_classes) == "binary":
        return keras.losses.BinaryCrossentropy(reduction=None)
    return keras.losses.SparseCategoricalCrossentropy(reduction=None)


def create_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=1e-4)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")
