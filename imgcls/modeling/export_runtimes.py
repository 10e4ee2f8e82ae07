"""Running an exported model with its own runtime (TensorFlow, onnxruntime, the LiteRT interpreter),
as a serving system would: the export job checks each export against the Keras model this way."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcls.modeling.export_formats import MODEL_FILES
from imgcls.modeling.serving import INPUT_NAME, OUTPUT_NAME
from imgcls.platform.logs import native_output_held


def exported_probabilities(export_format: str, directory: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities of float32 `images` (batch, height, width, channels) from the export in
    `directory`, through the format's own runtime and its named input and output."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if export_format == "saved_model":
        import tensorflow as tf

        signature = tf.saved_model.load(str(directory)).signatures["serving_default"]
        return signature(**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(directory / MODEL_FILES["onnx"]), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if export_format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        with native_output_held():  # the interpreter announces its XNNPACK delegate on stderr when it first runs
            runner = Interpreter(model_path=str(directory / MODEL_FILES["litert"])).get_signature_runner("serving_default")
            return runner(**{INPUT_NAME: images})[OUTPUT_NAME]
    raise ValueError(f"unknown export format {export_format!r}")
