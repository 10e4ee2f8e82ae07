"""The model with a second output: the features its output layer (`predictions`) sees, for the
monitoring embedding. One forward pass gives both, so monitoring costs no extra model call."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

OUTPUT_LAYER = "predictions"


def with_features(model):
    """A Keras model (images) -> [penultimate features, the model's output], or None for a model
    without an output layer named `predictions` (not built by imgcls): monitoring then goes without
    an embedding."""
    import keras

    try:
        layer = model.get_layer(OUTPUT_LAYER)
    except ValueError:
        logger.info("the model has no layer named %r: drift monitoring goes without the embedding", OUTPUT_LAYER)
        return None
    features = layer.input
    if len(features.shape) != 2:
        return None
    return keras.Model(model.inputs, [features, model.outputs[0]], name=f"{model.name}_with_features")
