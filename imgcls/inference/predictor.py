"""The model side of bulk classification: one `Predictor` built from an artifact, used alike in the
job's process and in Ray Data actor pools, turning decoded batches into class probabilities and
prediction rows."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa

from imgcls.config import EvaluateConfig, PredictConfig, StorageConfig
from imgcls.platform import storage

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = "unknown"

# What a Predictor returns per batch: Parquet prediction rows, or each image's probability per class.
Output = Literal["rows", "probabilities"]

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("model_version", pa.string()),
        pa.field("error", pa.string()),
        # Appended last, so readers that address columns by position keep working. Multi-label: every
        # class at or above its threshold; single-label: [label] ([] for `unknown`); null on error rows.
        pa.field("labels", pa.list_(pa.string())),
        # Uncertainty (see imgcls.monitoring.observations): top-1 minus top-2 probability, and the
        # entropy normalised to 0..1; null on error rows.
        pa.field("margin", pa.float32()),
        pa.field("entropy", pa.float32()),
    ]
)
# Columns a Predictor adds for the run's monitoring (imgcls.monitoring.run_monitor), which takes
# them off before the rows are written: the image statistics, the top-1 class and the projected features.
MONITOR_PREFIX = "_monitor_"


def class_probabilities(raw_outputs: np.ndarray, task: str) -> np.ndarray:
    """The model's outputs as one probability per class (a sigmoid unit becomes [1 - p, p]; a
    multi-label model's sigmoids are already one independent probability per class)."""
    raw_outputs = np.asarray(raw_outputs, dtype=np.float32)
    if task == "binary":
        positive = raw_outputs.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return raw_outputs


def _limit_tensorflow_threads(threads: int) -> None:
    """Keep TensorFlow to the CPUs the actor reserved: by default it spins up a thread per core of
    the node and competes with the decode tasks that Ray placed beside it."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran in this process (an in-process call): keep its pool.
        logger.debug("TensorFlow thread pools already initialised; not limiting them to %d", threads)


class Predictor:
    """Callable class for `Dataset.map_batches`: loads the artifact once per actor, then turns
    decoded batches (path, image, error) into prediction rows with the Parquet schema, or into
    probability rows (path, probabilities, error) for evaluation."""

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        batch_size: int,
        storage_config: StorageConfig | None = None,
        min_score: float | None = None,
        cpu_threads: int | None = None,
        lean_import: bool = False,
        output: Output = "rows",
        thresholds: list[float] | None = None,
        monitoring: bool = True,
    ):
        from imgcls.modeling.artifact import load_artifact
        from imgcls.platform.logs import native_chatter_filtered
        from imgcls.platform.tensorflow_import import import_for_inference

        if storage_config is not None:  # the job's endpoint and retry settings, also in an actor's process
            storage.configure(storage_config)
        with native_chatter_filtered():  # TensorFlow's start-up, up to its first device probe
            import_for_inference(lean=lean_import)
            if cpu_threads is not None:
                _limit_tensorflow_threads(cpu_threads)
            self.model, self.metadata = load_artifact(model_uri, storage_config.endpoint_url if storage_config else None)
        self.class_names = np.array(self.metadata.class_names, dtype=object)
        self.top_k = min(top_k, len(self.class_names))
        self.batch_size = batch_size
        self.min_score = min_score
        self.output = output
        # Multi-label models only: one per class, compared in float64 with each probability as stored.
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.projection = None
        self.features_model = None
        self.monitoring = monitoring
        if output == "rows" and monitoring:
            self._prepare_embedding(model_uri, storage_config)

    def _prepare_embedding(self, model_uri: str, storage_config: StorageConfig | None) -> None:
        """The profile's projection and the model with its features as a second output, when the
        artifact has a profile with an embedding that fits this model."""
        from imgcls.modeling.features import with_features
        from imgcls.monitoring.profile import read_profile

        found = read_profile(model_uri, storage_config.endpoint_url if storage_config else None)
        arrays = found[1] if found else None
        if arrays is None:
            return
        features_model = with_features(self.model)
        if features_model is None or features_model.outputs[0].shape[-1] != arrays.projection.shape[0]:
            logger.warning("the artifact's profile embedding does not fit its model: drift monitoring goes without it")
            return
        self.features_model, self.projection = features_model, arrays.projection

    @classmethod
    def from_artifact(
        cls, model_uri: str, top_k: int = 5, batch_size: int = 64, storage_config: StorageConfig | None = None
    ) -> "Predictor":
        return cls(model_uri, top_k, batch_size, storage_config)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.probabilities_and_embedding(images)[0]

    def probabilities_and_embedding(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities per image and, with a profile's projection, the projected features
        (from the same forward pass)."""
        model = self.features_model or self.model
        outputs, features = [], []
        for start in range(0, len(images), self.batch_size):
            result = model.predict_on_batch(images[start : start + self.batch_size].astype(np.float32))
            if self.features_model is not None:
                features.append(np.asarray(result[0], dtype=np.float32) @ self.projection)
                result = result[1]
            outputs.append(result)
        probabilities = class_probabilities(np.concatenate(outputs, axis=0), self.metadata.task)
        return probabilities, np.concatenate(features, axis=0) if features else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(path) for path in batch["path"]]
        errors = [str(error) for error in batch["error"]]
        readable = np.array([error == "" for error in errors], dtype=bool)
        if self.output == "probabilities":
            return self._probability_rows(batch, paths, errors, readable)
        rows = len(paths)
        labels: list[str | None] = [None] * rows
        scores: list[float | None] = [None] * rows
        top_labels: list[list[str] | None] = [None] * rows
        top_scores: list[list[float] | None] = [None] * rows
        label_sets: list[list[str] | None] = [None] * rows
        monitor_columns: dict[str, pa.Array] = {}
        if readable.any():
            probabilities, embedding = self.probabilities_and_embedding(batch["image"][readable])
            monitor_columns = self._monitor_columns(batch, readable, probabilities, embedding)
            ranking = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
            ranked_scores = np.take_along_axis(probabilities, ranking, axis=1)
            for position, row in enumerate(np.flatnonzero(readable)):
                top_labels[row] = self.class_names[ranking[position]].tolist()
                top_scores[row] = ranked_scores[position].tolist()
                scores[row] = float(ranked_scores[position, 0])
                below = self.min_score is not None and scores[row] < self.min_score
                labels[row] = UNKNOWN_LABEL if below else top_labels[row][0]
                if self.thresholds is not None:
                    chosen = probabilities[position].astype(np.float64) >= self.thresholds
                    label_sets[row] = self.class_names[chosen].tolist()
                else:
                    label_sets[row] = [] if below else [labels[row]]
        table = pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
                "score": pa.array(scores, pa.float32()),
                "top_k_labels": pa.array(top_labels, pa.list_(pa.string())),
                "top_k_scores": pa.array(top_scores, pa.list_(pa.float32())),
                "model_version": pa.array([self.metadata.model_version] * rows, pa.string()),
                "error": pa.array([error or None for error in errors], pa.string()),
                "labels": pa.array(label_sets, pa.list_(pa.string())),
                "margin": monitor_columns.pop("margin", pa.nulls(rows, pa.float32())),
                "entropy": monitor_columns.pop("entropy", pa.nulls(rows, pa.float32())),
            },
            schema=PREDICTION_SCHEMA,
        )
        for name, column in monitor_columns.items():
            table = table.append_column(name, column)
        return table

    def _monitor_columns(
        self, batch: dict[str, np.ndarray], readable: np.ndarray, probabilities: np.ndarray, embedding: np.ndarray | None
    ) -> dict[str, pa.Array]:
        """margin and entropy, and the hidden monitoring columns (null on error rows): the image
        statistics of the decoded pixels, the image's own size, the top-1 class, the embedding."""
        from imgcls.monitoring.observations import observe

        rows = len(readable)
        sizes = {name: batch.get(f"original_{name}", np.zeros(rows, np.int32))[readable] for name in ("width", "height")}
        observed = observe(probabilities, batch["image"][readable], sizes["width"], sizes["height"],
                           self.metadata.task == "multilabel", embedding)  # fmt: skip
        mask = ~readable  # pyarrow: True marks a null

        def spread(values: np.ndarray, dtype) -> pa.Array:
            full = np.zeros(rows, dtype=dtype.to_pandas_dtype())
            full[readable] = values
            return pa.array(full, dtype, mask=mask)

        columns = {name: spread(observed.scalars[name], pa.float32()) for name in ("margin", "entropy")}
        if not self.monitoring:
            return columns
        for name, values in observed.scalars.items():
            if name not in ("score", "margin", "entropy"):
                columns[MONITOR_PREFIX + name] = spread(values, pa.float32())
        columns[MONITOR_PREFIX + "top_class"] = spread(observed.top_class, pa.int32())
        if observed.embedding is not None:
            full = np.zeros((rows, observed.embedding.shape[1]), dtype=np.float32)
            full[readable] = observed.embedding
            flat = pa.array(full.reshape(-1), pa.float32())
            columns[MONITOR_PREFIX + "embedding"] = pa.FixedSizeListArray.from_arrays(flat, observed.embedding.shape[1], mask=pa.array(mask))
        return columns

    def _probability_rows(self, batch, paths: list[str], errors: list[str], readable: np.ndarray) -> pa.Table:
        """path, probabilities, error, and what decoding saw of each file for evaluation's dataset
        profile: its own width and height (0 on error) and, when decoded with digests, content_digest
        ("" when unread)."""
        probabilities: list[list[float] | None] = [None] * len(paths)
        if readable.any():
            for row, values in zip(np.flatnonzero(readable), self.probabilities(batch["image"][readable])):
                probabilities[row] = values.tolist()
        columns = {
            "path": pa.array(paths, pa.string()),
            "probabilities": pa.array(probabilities, pa.list_(pa.float32())),
            "error": pa.array([error or None for error in errors], pa.string()),
            "original_width": pa.array(np.asarray(batch["original_width"], dtype=np.int32), pa.int32()),
            "original_height": pa.array(np.asarray(batch["original_height"], dtype=np.int32), pa.int32()),
        }
        if "content_digest" in batch:
            columns["content_digest"] = pa.array([str(digest) for digest in batch["content_digest"]], pa.string())
        return pa.table(columns)


def predictor_arguments(
    config: PredictConfig | EvaluateConfig,
    top_k: int,
    min_score: float | None,
    output: Output = "rows",
    thresholds: list[float] | None = None,
) -> dict:
    return {
        "thresholds": thresholds,
        "model_uri": storage.resolve(config.model, config.storage.endpoint_url).uri,
        "top_k": top_k,
        "batch_size": config.batch_size,
        "storage_config": config.storage,
        "min_score": min_score,
        "output": output,
        "monitoring": getattr(config, "monitoring", True),
    }


def decode_arguments(config: PredictConfig | EvaluateConfig, metadata) -> dict:
    """What `decode_batch` needs, from the run's settings and the artifact (one mapping for both the
    decode threads and the Ray Data decode tasks)."""
    return {
        "image_size": tuple(metadata.image_size),
        "channels": metadata.channels,
        "max_pixels": config.max_image_pixels,
        "storage_config": config.storage,
        "max_bytes": config.max_image_bytes,
        # Evaluation hashes every file's bytes, for its dataset profile's exact duplicates and label
        # conflicts; prediction has no use for them and skips the hashing.
        "digests": isinstance(config, EvaluateConfig),
    }
