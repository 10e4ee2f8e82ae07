"""The model artifact: `model.keras` plus `metadata.json`, written safely and loaded safely."""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgcls import storage
from imgcls.errors import UserError

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


class ArtifactMetadata(BaseModel):
    """What a predictor needs to know about a model, and how it was made."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = Field(default=1, description="Layout version of the artifact directory.")
    model_version: str = Field(description="Stable for this artifact, unique across trainings.")
    created_at: str = Field(description="UTC ISO-8601 time the artifact was written.")
    class_names: list[str] = Field(description="Label names; index i is the model's output i.")
    image_size: tuple[int, int] = Field(description="[height, width] the model expects.")
    channels: int = Field(description="1 (greyscale) or 3 (RGB).")
    task: Literal["binary", "multiclass"]
    model_name: str
    metrics: dict[str, Any] = Field(default_factory=dict, description="Final training and validation metrics.")
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved training config.")
    data_summary: dict[str, Any] = Field(default_factory=dict, description="Images used and skipped per split.")


def make_model_version(model_bytes: bytes, created_at: datetime) -> str:
    """Time, content hash (tied to these exact weights) and a random suffix: two trainings in the
    same second, even of identical weights, never share a version."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:12]
    return f"{created_at.strftime('%Y%m%dT%H%M%SZ')}-{digest}-{secrets.token_hex(3)}"


def save_artifact(
    model, metadata_fields: dict[str, Any], destination_uri: str, endpoint_url: str | None = None
) -> ArtifactMetadata:
    """Save `model` (without optimizer state) and its metadata; metadata.json is written last,
    so a directory with metadata.json is always a complete artifact."""
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
    except (ValueError, ValidationError) as error:
        raise UserError(f"{metadata_location.uri} is not valid imgcls artifact metadata: {error}") from None


def load_artifact(artifact_uri: str, endpoint_url: str | None = None):
    """Return (keras model, metadata). The .keras file is loaded in safe mode: no arbitrary code runs,
    and nothing from the bucket is ever unpickled."""
    import keras

    import imgcls.backbones  # noqa: F401  (registers the custom preprocessing layer for safe loading)

    metadata = read_metadata(artifact_uri, endpoint_url)
    model_location = storage.resolve(artifact_uri, endpoint_url).join(MODEL_FILE)
    if not storage.exists(model_location):
        raise UserError(f"No {MODEL_FILE} in the artifact at {artifact_uri}.")
    with tempfile.TemporaryDirectory(prefix="imgcls-load-") as scratch:
        local_model = Path(scratch) / MODEL_FILE
        local_model.write_bytes(storage.read_bytes(model_location))
        model = keras.saving.load_model(local_model, compile=False, safe_mode=True)
    return model, metadata
