"""Settings of the export job (`jobs/export.py`): which artifact, which format, where to. Imports no
TensorFlow or Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from imgcls.config.common import StorageConfig, StrictModel, _usable_output, uri_contains
from imgcls.errors import clip

# The formats a model is exported to: TensorFlow's SavedModel (TF Serving), ONNX (onnxruntime and
# every ONNX runtime), LiteRT (the TFLite flatbuffer, for phones and edge devices).
ExportFormat = Literal["saved_model", "onnx", "litert"]
EXPORT_FORMATS: tuple[str, ...] = ("saved_model", "onnx", "litert")


class ExportConfig(StrictModel):
    """A model artifact exported for a serving runtime; CLI flags fill these and `--set` can change any."""

    model: str = Field(description="URI of a model artifact directory (contains model.keras and metadata.json).")
    format: ExportFormat = Field(
        description="saved_model (TensorFlow Serving, tf.saved_model.load), onnx (onnxruntime) or litert "
        "(the LiteRT / TFLite interpreter)."
    )
    output: str = Field(
        description="URI of the folder the exported model, labels.txt and metadata.json are written to: empty, "
        "missing, or an earlier imgcls export of the same format (its files are replaced). For TF Serving, "
        "a numeric version folder under the model's base path, e.g. exports/digits/1."
    )
    verify_images: int = Field(
        default=8,
        ge=0,
        le=256,
        description="Random 0-255 images run through the Keras model and through the exported one with its own "
        "runtime before anything is written; the export fails when they differ by more than max_difference. "
        "0 skips the check.",
    )
    max_difference: float = Field(
        default=1e-4,
        gt=0,
        le=1,
        description="Largest absolute difference of any class probability between the Keras model and the export "
        "that the check accepts (float32 conversions differ by about 1e-6).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("output")
    @classmethod
    def _output_usable(cls, value: str) -> str:
        return _usable_output(value)

    @model_validator(mode="after")
    def _output_outside_the_artifact(self) -> "ExportConfig":
        # The artifact's own folder would mix the export with model.keras (and its metadata.json).
        if uri_contains(self.output, self.model):
            raise ValueError(
                f"output ({clip(self.output)}) must not be the model artifact's folder or hold it "
                f"({clip(self.model)}): export into a folder of its own"
            )
        return self
