"""The model artifact: `model.keras` plus `metadata.json`, written safely and loaded safely."""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgcls.config import MAX_IMAGE_SIDE  # training's own bound: every artifact it writes fits
from imgcls.errors import SHOWN_VALUE_LIMIT, UserError, clip, shorten
from imgcls.platform import storage

MODEL_FILE = "model.keras"


def task_for(num_classes: int, multilabel: bool = False) -> str:
    """Two classes use one sigmoid unit (the tutorial's); more use a softmax over K units.
    Multi-label models have one sigmoid unit per class, whatever their number."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if multilabel:
        return "multilabel"
    return "binary" if num_classes == 2 else "multiclass"


def output_width(task: str, num_classes: int) -> int:
    """Units of the model's output layer: one sigmoid for binary, one per class otherwise."""
    return 1 if task == "binary" else num_classes


METADATA_FILE = "metadata.json"
# Validation problems listed in one message at most; the rest are counted.
LISTED_PROBLEMS = 5


def _quoted(value: Any, limit: int = SHOWN_VALUE_LIMIT) -> str:
    """A user's value as it reads in metadata.json (JSON for lists), cut to `limit` characters."""
    if isinstance(value, (list, tuple)):
        return clip(json.dumps(list(value), default=repr), limit)
    return shorten(value, limit)


class ArtifactMetadata(BaseModel):
    """What a predictor needs to know about a model, and how it was made."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = Field(default=1, description="Layout version of the artifact directory.")
    model_version: str = Field(description="Stable for this artifact, unique across trainings.")
    created_at: str = Field(description="UTC ISO-8601 time the artifact was written.")
    class_names: list[str] = Field(description="Label names; index i is the model's output i.")
    image_size: tuple[int, int] = Field(description="[height, width] the model expects.")
    channels: int = Field(description="1 (greyscale) or 3 (RGB).")
    task: Literal["binary", "multiclass", "multilabel"] = Field(
        description="binary: one sigmoid unit for class_names[1]; multiclass: a softmax over the classes; "
        "multilabel: a sigmoid per class, each image carrying any number of them."
    )
    thresholds: list[float] | None = Field(
        default=None,
        description="multilabel: per-class decision thresholds in class order (a class is predicted when its "
        "probability is at least its threshold), chosen on the validation split to maximise each class's F1.",
    )
    model_name: str
    metrics: dict[str, Any] = Field(default_factory=dict, description="Final training and validation metrics.")
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved training config.")
    data_summary: dict[str, Any] = Field(default_factory=dict, description="Images used and skipped per split.")

    @field_validator("class_names")
    @classmethod
    def _class_names_usable(cls, names: list[str]) -> list[str]:
        # Index i names output i: an empty, blank or repeated name makes some prediction unreadable.
        if not names:
            raise ValueError("must list at least one class name, got []")
        if any(not name for name in names):
            raise ValueError(f"every class name must be a non-empty string, got {_quoted(names)}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, {_quoted(duplicates)} repeated")
        return names

    @field_validator("image_size")
    @classmethod
    def _image_size_in_range(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
            raise ValueError(f"each side must be between 1 and {MAX_IMAGE_SIDE} pixels, got {list(size)}")
        return size

    @field_validator("channels")
    @classmethod
    def _channels_known(cls, channels: int) -> int:
        if channels not in (1, 3):
            raise ValueError(f"must be 1 (greyscale) or 3 (RGB), got {channels}")
        return channels

    @model_validator(mode="after")
    def _task_fits_class_count(self) -> "ArtifactMetadata":
        # A binary model has one sigmoid output for class_names[1]; a softmax needs two or more.
        count = len(self.class_names)
        if self.task == "binary" and count != 2:
            raise ValueError(f"task: binary needs exactly 2 class names, got {count}")
        if self.task in ("multiclass", "multilabel") and count < 2:
            raise ValueError(f"task: {self.task} needs at least 2 class names, got {count}")
        if self.thresholds is not None:
            if self.task != "multilabel":
                raise ValueError(f"thresholds apply to task multilabel only, not {self.task}")
            if len(self.thresholds) != count:
                raise ValueError(f"thresholds: one per class name needed ({count}), got {len(self.thresholds)}")
            if not all(0.0 <= value <= 1.0 for value in self.thresholds):
                raise ValueError(f"thresholds must each be between 0 and 1, got {_quoted(self.thresholds)}")
        return self

    def decision_thresholds(self) -> list[float]:
        """The per-class thresholds of a multi-label model (0.5 each where training stored none)."""
        return list(self.thresholds) if self.thresholds is not None else [0.5] * len(self.class_names)


def make_model_version(model_bytes: bytes, created_at: datetime) -> str:
    """Time, content hash (tied to these exact weights) and a random suffix: two trainings in the
    same second, even of identical weights, never share a version."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:12]
    return f"{created_at.strftime('%Y%m%dT%H%M%SZ')}-{digest}-{secrets.token_hex(3)}"


def save_artifact(
    model,
    metadata_fields: dict[str, Any],
    destination_uri: str,
    endpoint_url: str | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> ArtifactMetadata:
    """Save `model` (without optimizer state), `extra_files` (the reference profile) and its
    metadata; metadata.json is written last, so a directory with metadata.json is always a complete
    artifact."""
    created = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="imgcls-artifact-") as scratch:
        model_path = Path(scratch) / MODEL_FILE
        model.save(model_path, include_optimizer=False)
        model_bytes = model_path.read_bytes()
    metadata = ArtifactMetadata(
        model_version=make_model_version(model_bytes, created),
        created_at=created.isoformat(),
        **metadata_fields,
    )
    destination = storage.resolve(destination_uri, endpoint_url)
    storage.write_bytes_atomic(destination.join(MODEL_FILE), model_bytes)
    for name, data in (extra_files or {}).items():
        storage.write_bytes_atomic(destination.join(name), data)
    storage.write_text_atomic(destination.join(METADATA_FILE), metadata.model_dump_json(indent=2))
    return metadata


def read_metadata(artifact_uri: str, endpoint_url: str | None = None) -> ArtifactMetadata:
    location = storage.resolve(artifact_uri, endpoint_url)
    metadata_location = location.join(METADATA_FILE)
    if not storage.exists(metadata_location):
        raise UserError(
            f"No model artifact at {artifact_uri}: {METADATA_FILE} is missing. Point --model at the "
            "`model` folder a training run wrote (output_dir/model)."
        )
    try:
        return ArtifactMetadata.model_validate(json.loads(storage.read_bytes(metadata_location)))
    except ValidationError as error:
        raise UserError(
            f"{metadata_location.uri} is not valid imgcls artifact metadata: {_validation_problems(error)}."
        ) from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise UserError(
            f"{metadata_location.uri} is not valid imgcls artifact metadata: not a JSON document "
            f"({clip(str(error))})."
        ) from None


def _validation_problems(error: ValidationError) -> str:
    """One short clause per bad field (`image_size: each side must be ...`), not pydantic's whole dump."""
    problems = []
    for problem in error.errors(include_url=False):
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] not in ("value_error", "missing") and problem["loc"]:
            # Pydantic's own messages do not say what was found.
            message += f", got {_quoted(problem['input'], 80)}"
        problems.append(f"{field}: {message}" if field else message)
    listed = "; ".join(problems[:LISTED_PROBLEMS])
    more = len(problems) - LISTED_PROBLEMS
    return listed + (f"; and {more} more problem(s)" if more > 0 else "")


def _is_safe_mode_refusal(error: Exception) -> bool:
    # Keras refuses a Lambda layer (or other code-carrying object) with a ValueError that tells how to
    # allow it (possibly nested in another layer's TypeError): a refusal, not damage.
    return "safe_mode=False" in str(error)


def _first_line(error: BaseException) -> str:
    # Keras nests each layer's failure as "... Exception encountered: <inner>"; the innermost says why.
    innermost = str(error).rsplit("Exception encountered: ", 1)[-1]
    lines = innermost.strip().splitlines()
    return clip(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)


def _load_keras_file(local_model: Path, model_uri: str):
    import keras

    def damaged(reason: str) -> UserError:
        return UserError(
            f"the model file {model_uri} is damaged ({reason}). Copy the artifact again from where training "
            "wrote it, or train again."
        )

    # Keras reports a file that is not a zip archive as "File not found", which misleads.
    if not zipfile.is_zipfile(local_model):
        raise damaged(f"not a zip archive: {local_model.stat().st_size} bytes, truncated or not a .keras file")
    try:
        return keras.saving.load_model(local_model, compile=False, safe_mode=True)
    except MemoryError:
        raise
    except Exception as error:
        if _is_safe_mode_refusal(error):
            raise UserError(
                f"The model file {model_uri} holds code (a Lambda layer or another Python object) that Keras' "
                "safe mode refuses to run, and imgcls never loads an artifact with safe mode off. Train the model "
                "with imgcls, or rebuild it from standard Keras layers."
            ) from None
        raise damaged(_first_line(error)) from None


def _shape_text(shape) -> str:
    return "(" + ", ".join("None" if side is None else str(side) for side in shape) + ")"


def check_model_fits_metadata(model, metadata: ArtifactMetadata, artifact_uri: str) -> None:
    """Raise UserError unless the model takes (batch, height, width, channels) images of the metadata's
    size and gives one score per class (one sigmoid for binary): otherwise it would predict garbage."""
    inputs = list(getattr(model, "inputs", None) or [])
    outputs = list(getattr(model, "outputs", None) or [])
    where = f"The model in {artifact_uri}"
    if len(inputs) != 1:
        raise UserError(f"{where} has {len(inputs)} inputs; an imgcls model has exactly one (the image batch).")
    if len(outputs) != 1:
        raise UserError(f"{where} has {len(outputs)} outputs; an imgcls model has exactly one (the class scores).")
    input_shape = tuple(inputs[0].shape)
    expected_input = (None, *metadata.image_size, metadata.channels)
    # None in the model means any size fits that dimension.
    if len(input_shape) != 4 or any(
        side is not None and side != wanted for side, wanted in zip(input_shape[1:], expected_input[1:])
    ):
        raise UserError(
            f"{where} takes input of shape {_shape_text(input_shape)}, but its {METADATA_FILE} says "
            f"image_size {list(metadata.image_size)} with {metadata.channels} channel(s), "
            f"i.e. {_shape_text(expected_input)}."
        )
    output_shape = tuple(outputs[0].shape)
    classes = len(metadata.class_names)
    width = output_width(metadata.task, classes)
    if len(output_shape) != 2 or output_shape[1] != width:
        meaning = {"binary": "one sigmoid score", "multilabel": "one sigmoid score per class name"}.get(
            metadata.task, "one score per class name"
        )
        raise UserError(
            f"{where} gives output of shape {_shape_text(output_shape)}, but its {METADATA_FILE} says task "
            f"{metadata.task} with {classes} class names, which needs (None, {width}): {meaning}."
        )


def load_artifact(artifact_uri: str, endpoint_url: str | None = None):
    """Return (keras model, metadata). The .keras file is loaded in safe mode: no arbitrary code runs,
    and nothing from the bucket is ever unpickled. A model that does not fit its metadata is refused."""
    import imgcls.modeling.backbones  # noqa: F401  (registers the custom preprocessing layer for safe loading)

    metadata = read_metadata(artifact_uri, endpoint_url)
    model_location = storage.resolve(artifact_uri, endpoint_url).join(MODEL_FILE)
    if not storage.exists(model_location):
        raise UserError(f"No {MODEL_FILE} in the artifact at {artifact_uri}.")
    with tempfile.TemporaryDirectory(prefix="imgcls-load-") as scratch:
        local_model = Path(scratch) / MODEL_FILE
        local_model.write_bytes(storage.read_bytes(model_location))
        model = _load_keras_file(local_model, model_location.uri)
    check_model_fits_metadata(model, metadata, artifact_uri)
    return model, metadata
