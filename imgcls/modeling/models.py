"""Model builders. Every model takes raw uint8-range pixels: scaling happens inside the model."""

from __future__ import annotations

import keras

from imgcls.config import BACKBONES, ModelConfig
from imgcls.modeling.artifact import task_for  # noqa: F401  (part of this module's interface)


def classification_head(features, num_classes: int, multilabel: bool = False):
    """The output layer, named `predictions` for every task: one sigmoid for two single-label
    classes, a softmax over K, or a sigmoid per class for multi-label images (each class on its own)."""
    task = task_for(num_classes, multilabel)
    if task == "multilabel":
        return keras.layers.Dense(num_classes, activation="sigmoid", name="predictions", dtype="float32")(features)
    if task == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="predictions", dtype="float32")(features)
    return keras.layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32")(features)


def create_seed_cnn(image_size: tuple[int, int], channels: int, num_classes: int, multilabel: bool = False) -> keras.Model:
    """The tutorial's network: Conv2D(32, 3x3, relu) -> MaxPool(2x2) -> Flatten -> Dense(128, relu) -> output."""
    inputs = keras.Input(shape=(*image_size, channels), name="image")
    rescaled = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    features = keras.layers.Conv2D(32, (3, 3), activation="relu", name="conv")(rescaled)
    features = keras.layers.MaxPooling2D((2, 2), name="pool")(features)
    features = keras.layers.Flatten(name="flatten")(features)
    features = keras.layers.Dense(128, activation="relu", name="dense")(features)
    outputs = classification_head(features, num_classes, multilabel)
    return keras.Model(inputs, outputs, name="seed_cnn")


def create_cnn(
    config: ModelConfig, image_size: tuple[int, int], channels: int, num_classes: int, multilabel: bool = False
) -> keras.Model:
    """A deeper, regularised CNN: conv blocks (Conv-BN-ReLU x n, pooling, dropout), then a dense head."""
    inputs = keras.Input(shape=(*image_size, channels), name="image")
    features = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    pooling_layer = keras.layers.MaxPooling2D if config.pooling == "max" else keras.layers.AveragePooling2D
    for block, filters in enumerate(config.filters, start=1):
        for conv in range(1, config.convs_per_block + 1):
            name = f"block{block}_conv{conv}"
            features = keras.layers.Conv2D(
                filters, config.kernel_size, padding="same", use_bias=not config.batch_norm, name=name
            )(features)
            if config.batch_norm:
                features = keras.layers.BatchNormalization(momentum=config.batch_norm_momentum, name=f"{name}_bn")(features)
            features = keras.layers.Activation("relu", name=f"{name}_relu")(features)
        if min(features.shape[1], features.shape[2]) >= 2:
            features = pooling_layer((2, 2), name=f"block{block}_pool")(features)
        if config.block_dropout:
            features = keras.layers.Dropout(config.block_dropout, name=f"block{block}_dropout")(features)
    if config.head == "global_average":
        features = keras.layers.GlobalAveragePooling2D(name="global_pool")(features)
    else:
        features = keras.layers.Flatten(name="flatten")(features)
    return keras.Model(inputs, dense_head(features, config, num_classes, multilabel), name="cnn")


def dense_head(features, config: ModelConfig, num_classes: int, multilabel: bool = False):
    """Feature vector -> (dropout, Dense relu) per `dense_units` -> dropout -> class probabilities."""
    for index, units in enumerate(config.dense_units, start=1):
        if config.dense_dropout:
            features = keras.layers.Dropout(config.dense_dropout, name=f"dense{index}_dropout")(features)
        features = keras.layers.Dense(units, activation="relu", name=f"dense{index}")(features)
    if config.dense_dropout:
        features = keras.layers.Dropout(config.dense_dropout, name="head_dropout")(features)
    return classification_head(features, num_classes, multilabel)


def create_model(
    config: ModelConfig, image_size: tuple[int, int], channels: int, num_classes: int, multilabel: bool = False
) -> keras.Model:
    """Build the configured architecture (uncompiled, randomly initialised). `multilabel` is the
    run's resolved task (model.task and the data decide it, see imgcls.training.task)."""
    if config.name == "seed_cnn":
        return create_seed_cnn(tuple(image_size), channels, num_classes, multilabel)
    if config.name == "cnn":
        return create_cnn(config, tuple(image_size), channels, num_classes, multilabel)
    if config.name in BACKBONES:
        from imgcls.modeling.backbones import create_backbone_model

        # Random weights here: pretrained ones are loaded once on the driver (initial_weights.py).
        return create_backbone_model(config, tuple(image_size), channels, num_classes, None, multilabel)
    raise ValueError(f"unknown model.name {config.name!r}")


def create_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=1e-4)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")
