"""A finished training's (or Tune search's) outputs in its MLflow run: copied as MLflow artifacts
when output_dir is local, linked by tags when it is a bucket (the bucket is already the durable store
the team reads from: copying the model would double its storage and the end of every training)."""

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


# A Tune search's own outputs, logged to its parent run.
SEARCH_OUTPUT_FILES = ("trials.csv", "trials.png", "best_config.yaml", "tune_config.yaml")


def log_outputs(client, run_id: str, output_dir: storage.Location) -> None:
    """The model folder and OUTPUT_FILES as artifacts of `run_id`, or (a bucket) as link tags."""
    artifact = output_dir.join(MODEL_FOLDER)
    if output_dir.is_local:
        client.log_artifacts(run_id, artifact.path, artifact_path=MODEL_FOLDER)
    present = log_files(client, run_id, output_dir, OUTPUT_FILES, {"imgcls.artifact_uri": artifact.uri})
    if output_dir.is_local:
        logger.info("MLflow run %s holds the model and %s as artifacts", run_id, ", ".join(present))
    else:
        logger.info("MLflow run %s links the outputs in %s (not copied)", run_id, output_dir.uri)


def log_search_outputs(client, run_id: str, output_dir: storage.Location) -> list[str]:
    """A search's SEARCH_OUTPUT_FILES as artifacts of its run, or (a bucket) as link tags; the names logged."""
    return log_files(client, run_id, output_dir, SEARCH_OUTPUT_FILES, {"imgcls.artifact_uri": output_dir.join(MODEL_FOLDER).uri})


def log_files(client, run_id: str, output_dir: storage.Location, names: tuple[str, ...],
              tags: dict[str, str]) -> list[str]:  # fmt: skip
    """The files `names` that output_dir holds, copied as artifacts of `run_id` when it is local,
    else linked by tags, and `tags` with them; returns the names present."""
    present = [name for name in names if storage.exists(output_dir.join(name))]
    if not output_dir.is_local:
        links = {link_tag(name, names): output_dir.join(name).uri for name in present}
        set_tags(client, run_id, credential_free({**tags, "imgcls.outputs": "linked", **links}))
        return present
    set_tags(client, run_id, credential_free({**tags, "imgcls.outputs": "copied"}))
    for name in present:
        client.log_artifact(run_id, output_dir.join(name).path)
    return present


def link_tag(file_name: str, names: tuple[str, ...] = ()) -> str:
    """The tag that links one output file: `imgcls.history_uri` for history.csv; where another of
    `names` has the same stem, the extension stays in it (`imgcls.trials_csv_uri`, `imgcls.trials_png_uri`)."""
    stem = PurePosixPath(file_name).stem
    shared = [name for name in names if name != file_name and PurePosixPath(name).stem == stem]
    return f"imgcls.{file_name.replace('.', '_') if shared else stem}_uri"


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()], synchronous=True)
