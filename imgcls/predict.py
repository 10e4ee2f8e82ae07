"""Bulk classification: a `Predictor` for Ray Data actor pools, and the job that writes Parquet."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from imgcls import storage
from imgcls.config import PredictConfig
from imgcls.errors import DataError

logger = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("model_version", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def class_probabilities(raw_outputs: np.ndarray, task: str) -> np.ndarray:
    """The model's outputs as one probability per class (a sigmoid unit becomes [1 - p, p])."""
    raw_outputs = np.asarray(raw_outputs, dtype=np.float32)
    if task == "binary":
        positive = raw_outputs.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return raw_outputs


class Predictor:
    """Callable class for `Dataset.map_batches`: loads the artifact once per actor, then turns
    decoded batches (path, image, error) into prediction rows with the DESIGN.md schema."""

    def __init__(self, model_uri: str, top_k: int, batch_size: int, endpoint_url: str | None = None):
        from imgcls.artifact import load_artifact

        self.model, self.metadata = load_artifact(model_uri, endpoint_url)
        self.class_names = np.array(self.metadata.class_names, dtype=object)
        self.top_k = min(top_k, len(self.class_names))
        self.batch_size = batch_size

    @classmethod
    def from_artifact(
        cls, model_uri: str, top_k: int = 5, batch_size: int = 64, endpoint_url: str | None = None
    ) -> "Predictor":
        return cls(model_uri, top_k, batch_size, endpoint_url)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        outputs = [
            self.model.predict_on_batch(images[start : start + self.batch_size].astype(np.float32))
            for start in range(0, len(images), self.batch_size)
        ]
        return class_probabilities(np.concatenate(outputs, axis=0), self.metadata.task)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(path) for path in batch["path"]]
        errors = [str(error) for error in batch["error"]]
        readable = np.array([error == "" for error in errors], dtype=bool)
        rows = len(paths)
        labels: list[str | None] = [None] * rows
        scores: list[float | None] = [None] * rows
        top_labels: list[list[str] | None] = [None] * rows
        top_scores: list[list[float] | None] = [None] * rows
        if readable.any():
            probabilities = self.probabilities(batch["image"][readable])
            ranking = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
            ranked_scores = np.take_along_axis(probabilities, ranking, axis=1)
            for position, row in enumerate(np.flatnonzero(readable)):
                top_labels[row] = self.class_names[ranking[position]].tolist()
                top_scores[row] = ranked_scores[position].tolist()
                labels[row] = top_labels[row][0]
                scores[row] = float(ranked_scores[position, 0])
        return pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
                "score": pa.array(scores, pa.float32()),
                "top_k_labels": pa.array(top_labels, pa.list_(pa.string())),
                "top_k_scores": pa.array(top_scores, pa.list_(pa.float32())),
                "model_version": pa.array([self.metadata.model_version] * rows, pa.string()),
                "error": pa.array([error or None for error in errors], pa.string()),
            },
            schema=PREDICTION_SCHEMA,
        )


class PredictSummary(BaseModel):
    model_config = {"protected_namespaces": ()}

    output_uri: str
    model_version: str
    images_listed: int
    classified: int
    errored: int
    seconds: float
    images_per_second: float
    files: list[str]


def _commit_staged_files(staging: storage.Location, output: storage.Location, run_id: str) -> list[str]:
    """Move each staged Parquet file into the output folder under a run-unique name."""
    import pyarrow.fs as pafs

    staged = sorted(
        info.path
        for info in staging.filesystem.get_file_info(pafs.FileSelector(staging.path, recursive=True))
        if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    )
    committed = []
    for number, path in enumerate(staged):
        target = output.join(f"part-{run_id}-{number:05d}.parquet")
        output.filesystem.move(path, target.path)
        committed.append(target.uri)
    output.filesystem.delete_dir(staging.path)
    staging_root = staging.parent
    if not output.filesystem.get_file_info(pafs.FileSelector(staging_root.path, allow_not_found=True)):
        # Object stores keep an empty "folder" marker behind; drop it once no run is staging.
        output.filesystem.delete_dir(staging_root.path)
    return committed


def _count_rows(files: list[str], endpoint_url: str | None) -> tuple[int, int]:
    import pyarrow.parquet as pq

    rows = errored = 0
    for uri in files:
        location = storage.resolve(uri, endpoint_url)
        with location.filesystem.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["error"])
        rows += table.num_rows
        errored += table.num_rows - table.column("error").null_count
    return rows, errored


def run(config: PredictConfig) -> PredictSummary:
    """Classify every image under `config.input` and write one Parquet row per image to `config.output`."""
    import ray.data

    from imgcls.artifact import read_metadata
    from imgcls.data import decoded_dataset, list_prediction_inputs
    from imgcls.ray_runtime import cluster_totals, ensure_ray
    from imgcls.resources import plan_prediction

    started = time.perf_counter()
    endpoint_url = config.storage.endpoint_url
    metadata = read_metadata(config.model, endpoint_url)
    listing = list_prediction_inputs(config.input, endpoint_url)
    if not listing.paths:
        raise DataError(f"No images found under {config.input} ({listing.ignored} non-image or hidden files ignored).")
    top_k = config.top_k or min(5, len(metadata.class_names))
    ensure_ray()
    totals = cluster_totals()
    plan = plan_prediction(config.num_actors, config.use_gpu, totals["CPU"], totals["GPU"])
    logger.info(
        "classifying %d images from %s with model %s (%d actor(s) x %g CPU%s)",
        len(listing.paths),
        config.input,
        metadata.model_version,
        plan.num_actors,
        plan.cpus_per_actor,
        ", 1 GPU" if plan.gpus_per_actor else "",
    )
    dataset = decoded_dataset(
        listing.paths,
        None,
        tuple(metadata.image_size),
        metadata.channels,
        config.max_image_pixels,
        config.decode_batch_size,
        endpoint_url,
    )
    predictions = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": storage.resolve(config.model, endpoint_url).uri,
            "top_k": top_k,
            "batch_size": config.batch_size,
            "endpoint_url": endpoint_url,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
    )
    output = storage.resolve(config.output, endpoint_url)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    staging = output.join("_staging", run_id)
    predictions.write_parquet(staging.path, filesystem=output.filesystem, try_create_dir=output.is_local)
    files = _commit_staged_files(staging, output, run_id)
    rows, errored = _count_rows(files, endpoint_url)
    if rows != len(listing.paths):
        raise RuntimeError(f"wrote {rows} prediction rows for {len(listing.paths)} images")
    seconds = time.perf_counter() - started
    summary = PredictSummary(
        output_uri=output.uri,
        model_version=metadata.model_version,
        images_listed=len(listing.paths),
        classified=rows - errored,
        errored=errored,
        seconds=round(seconds, 3),
        images_per_second=round(rows / seconds, 1),
        files=[PurePosixPath(uri).name for uri in files],
    )
    logger.info(
        "done: %d images listed, %d classified, %d errored, %.1f images/s, output %s",
        summary.images_listed,
        summary.classified,
        summary.errored,
        summary.images_per_second,
        summary.output_uri,
    )
    return summary
