"""Starting weights for a training run, prepared once on the driver: pretrained backbone weights
(`model.weights`) or an earlier artifact's weights (`model.init_from`). Workers receive them
through the object store, so no worker downloads anything and all replicas start identical."""

from __future__ import annotations

import logging

import numpy as np

from imgcls.config import BACKBONES, JobConfig
from imgcls.errors import ConfigError

logger = logging.getLogger(__name__)

HEAD_LAYER_NAME = "predictions"


def _weight_shapes(layer) -> list[tuple[int, ...]]:
    return [tuple(weight.shape) for weight in layer.weights]


def transfer_weights(source, target, same_classes: bool) -> tuple[list[str], list[str]]:
    """Copy every layer's weights from `source` into the same-named layer of `target`. The head is
    copied only when the classes are the same. Returns (copied, fresh) layer names; any other layer
    that does not match is an error, because a half-initialised body is not a warm start."""
    copied, fresh, mismatched = [], [], []
    for layer in target.layers:
        if not layer.weights:
            continue
        if layer.name == HEAD_LAYER_NAME and not same_classes:
            fresh.append(layer.name)
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            mismatched.append(f"{layer.name} (missing)")
            continue
        if _weight_shapes(source_layer) != _weight_shapes(layer):
            mismatched.append(f"{layer.name} {_weight_shapes(source_layer)} vs {_weight_shapes(layer)}")
            continue
        layer.set_weights(source_layer.get_weights())
        copied.append(layer.name)
    if mismatched:
        raise ConfigError(
            "model.init_from: the artifact's network does not match this config's model: "
            + "; ".join(mismatched[:5])
            + ". Warm starts need the same model.* settings, data.image_size and data.channels as the artifact."
        )
    return copied, fresh


def _warm_start(config: JobConfig, class_names: list[str], multilabel: bool = False) -> list[np.ndarray]:
    from imgcls.modeling.artifact import load_artifact, task_for
    from imgcls.modeling.models import create_model

    source, metadata = load_artifact(config.model.init_from, config.storage.endpoint_url)
    if tuple(metadata.image_size) != tuple(config.data.image_size) or metadata.channels != config.data.channels:
        raise ConfigError(
            f"model.init_from {config.model.init_from} was trained on {list(metadata.image_size)} pixels with "
            f"{metadata.channels} channel(s); this config has data.image_size={list(config.data.image_size)}, "
            f"data.channels={config.data.channels}. Use the artifact's size and channels."
        )
    target = create_model(config.model, tuple(config.data.image_size), config.data.channels, len(class_names), multilabel)
    task = task_for(len(class_names), multilabel)
    # The head is kept only for the same classes and the same task: a softmax's weights are no
    # starting point for sigmoids per class (nor the other way round), even at the same width.
    same_head = list(metadata.class_names) == list(class_names) and metadata.task == task
    copied, fresh = transfer_weights(source, target, same_head)
    if not fresh:
        why = ""
    elif metadata.task != task:
        why = f", new {task} head for classes {class_names} (artifact: {metadata.task} for {metadata.class_names})"
    else:
        why = f", new head for classes {class_names} (artifact had {metadata.class_names})"
    logger.info(
        "warm start from %s (model %s): %d layers copied%s", config.model.init_from, metadata.model_version, len(copied), why
    )
    return target.get_weights()


def prepare_initial_weights(config: JobConfig, class_names: list[str], multilabel: bool = False) -> list[np.ndarray] | None:
    """The weights every worker starts from, or None for a fresh seeded initialisation (made by
    the workers: the driver then never imports TensorFlow)."""
    pretrained = config.model.name in BACKBONES and config.model.weights != "none"
    if not config.model.init_from and not pretrained:
        return None
    import keras

    # Seeded, so the new head starts the same way on every run of the same config.
    keras.utils.set_random_seed(config.seed)
    if config.model.init_from:
        return _warm_start(config, class_names, multilabel)
    from imgcls.modeling.backbones import load_pretrained_model

    model = load_pretrained_model(
        config.model, tuple(config.data.image_size), config.data.channels, len(class_names), config.storage.endpoint_url,
        multilabel,
    )
    logger.info("backbone %s: weights from %s", config.model.name, config.model.weights)
    return model.get_weights()
