"""The serving graph every export holds: raw pixels in, one probability per class out, under fixed names.

imgcls models already take raw 0-255 pixels and scale them themselves (Rescaling, CaffePreprocessing,
a backbone's own preprocessing), so the graph is the artifact's model wrapped once: a named input, and
the model's output as one probability per class, the same numbers `class_probabilities` gives the
Parquet top-k (a binary model's one sigmoid unit becomes two columns [1 - p, p]; a softmax and a
multi-label model's per-class sigmoids stay as they are).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from imgcls.modeling.artifact import ArtifactMetadata

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# Only float32 is accepted: every runtime would need a second signature for uint8, and a cast on the
# client (`images.astype(np.float32)`) costs nothing.
INPUT_DTYPE = "float32"
OUTPUT_DTYPE = "float32"

OUTPUT_MEANING = {
    "binary": "two columns [1 - p, p] from the model's one sigmoid unit (p is class_names[1]), as the Parquet top-k",
    "multiclass": "a softmax over the classes: each row sums to 1",
    "multilabel": "a sigmoid per class, each independent: compare with metadata thresholds (0.5 when unset)",
}


def input_shape(metadata: ArtifactMetadata) -> list[int | None]:
    height, width = metadata.image_size
    return [None, height, width, metadata.channels]


def output_shape(metadata: ArtifactMetadata) -> list[int | None]:
    return [None, len(metadata.class_names)]


def serving_model(model: keras.Model, metadata: ArtifactMetadata) -> keras.Model:
    """`model` behind the export contract: input `image` float32 (batch, height, width, channels) of raw
    0-255 pixels, output `probabilities` float32 (batch, classes). Called once, as the ONNX export
    requires of a model."""
    _, height, width, channels = input_shape(metadata)
    image = keras.Input(shape=(height, width, channels), dtype=INPUT_DTYPE, name=INPUT_NAME)
    scores = model(image)
    if metadata.task == "binary":
        probabilities = keras.layers.Concatenate(axis=-1, name=OUTPUT_NAME)([1.0 - scores, scores])
    else:
        probabilities = keras.layers.Identity(name=OUTPUT_NAME)(scores)
    # A dict output names the SavedModel signature's output key, the ONNX output and the LiteRT one.
    serving = keras.Model(image, {OUTPUT_NAME: probabilities}, name="serving")
    serving(np.zeros((1, height, width, channels), dtype=np.float32))
    return serving


def contract(metadata: ArtifactMetadata) -> dict[str, Any]:
    """The input and output an export promises, as metadata.json records them."""
    return {
        "input": {
            "name": INPUT_NAME,
            "shape": input_shape(metadata),
            "dtype": INPUT_DTYPE,
            "layout": "NHWC",
            "pixels": "raw 0-255 values (no scaling: the model's own preprocessing is inside)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": output_shape(metadata),
            "dtype": OUTPUT_DTYPE,
            "meaning": OUTPUT_MEANING.get(metadata.task, OUTPUT_MEANING["multiclass"]),
        },
    }
