"""A finished training's outputs in its MLflow run: copied as MLflow artifacts when output_dir is
local, linked by tags when it is a bucket (the bucket is already the durable store the team reads
from: copying the model would double its storage and the end of every training)."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from imgcls.platform import storage
from imgcls.tracking.tags import credential_free

logger = logging.getLogger(__name__)

# The model artifact's folder in output_dir, and its artifact path in the MLflow run.
MODEL_FOLDER = "model"


# The run's other outputs a person opens from the MLflow UI, by their names in output_dir (the ones
# a run wrote).
OUTPUT_FILES = (
    "training_curves.png", "history.csv", "skipped_images.parquet", "augmentation_samples.png", "config.yaml",
    "timings.json",
)  # fmt: skip


def log_outputs(client, run_id: str, output_dir: storage.Location) -> None:
    """The model folder and OUTPUT_FILES as artifacts of `run_id`, or (a bucket) as link tags."""
    present = [name for name in OUTPUT_FILES if storage.exists(output_dir.join(name))]
    artifact = output_dir.join(MODEL_FOLDER)
    if not output_dir.is_local:
        tags = {"imgcls.artifact_uri": artifact.uri, "imgcls.outputs": "linked"}
        tags.update({link_tag(name): output_dir.join(name).uri for name in present})
        set_tags(client, run_id, credential_free(tags))
        logger.info("MLflow run %s links the outputs in %s (not copied)", run_id, output_dir.uri)
        return
    set_tags(client, run_id, credential_free({"imgcls.artifact_uri": artifact.uri, "imgcls.outputs": "copied"}))
    client.log_artifacts(run_id, artifact.path, artifact_path=MODEL_FOLDER)
    for name in present:
        client.log_artifact(run_id, output_dir.join(name).path)
    logger.info("MLflow run %s holds the model and %s as artifacts", run_id, ", ".join(present))


def link_tag(file_name: str) -> str:
    """The tag that links one output file: `imgcls.history_uri` for history.csv."""
    return f"imgcls.{PurePosixPath(file_name).stem}_uri"


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()], synchronous=True)
