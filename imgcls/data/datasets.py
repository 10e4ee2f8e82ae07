"""The Ray Data side of decoding: path tables, the lazy decoded dataset, and the decoded,
materialised training splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from imgcls.config import DEFAULT_MAX_IMAGE_BYTES, StorageConfig
from imgcls.data.listing import LabelledImages
from imgcls.data.reading import decode_batch
from imgcls.errors import user_errors_from_ray

logger = logging.getLogger(__name__)

# Rows per Ray Data block before decoding: several decode batches, so tasks are neither tiny nor huge.
ROWS_PER_BLOCK = 256


def label_column(labels: np.ndarray) -> pa.Array:
    """Class indices (images,) as int32, or multi-label 0/1 vectors (images, classes) as a float32
    tensor column: Ray Data hands the latter to a numpy batch as one (batch, classes) float32 array."""
    if labels.ndim == 1:
        return pa.array(labels, pa.int32())
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))


def paths_table(
    paths: list[str], label_indices: np.ndarray | None = None, rows_per_block: int = ROWS_PER_BLOCK
) -> list[pa.Table]:
    """Split path rows into several Arrow tables so Ray Data can decode them in parallel.
    `label_indices` are class indices, or a label matrix for multi-label images (see `label_column`)."""
    tables = []
    for start in range(0, len(paths), rows_per_block):
        stop = min(start + rows_per_block, len(paths))
        columns: dict[str, Any] = {
            "path": pa.array(paths[start:stop], pa.string()),
            "row": pa.array(np.arange(start, stop), pa.int64()),
        }
        if label_indices is not None:
            columns["label"] = label_column(label_indices[start:stop])
        tables.append(pa.table(columns))
    return tables


def decoded_dataset(
    paths: list[str],
    label_indices: np.ndarray | None,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    decode_batch_size: int,
    storage_config: StorageConfig | None = None,
    num_cpus: float | None = None,
    rows_per_block: int = ROWS_PER_BLOCK,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    digests: bool = False,
):
    """A lazy Ray Dataset of path (+label), image, error, original_width and original_height columns
    (and content_digest with `digests`); one decode task per block, each reading with the job's
    `storage_config` (endpoint, retries)."""
    import ray.data

    dataset = ray.data.from_arrow(paths_table(paths, label_indices, rows_per_block))
    resources = {"num_cpus": num_cpus} if num_cpus is not None else {}
    return dataset.map_batches(
        decode_batch,
        batch_size=decode_batch_size,
        batch_format="numpy",
        **resources,
        fn_kwargs={
            "image_size": tuple(image_size),
            "channels": channels,
            "max_pixels": max_pixels,
            "storage_config": storage_config,
            "max_bytes": max_bytes,
            "digests": digests,
        },
    )


@dataclass
class PreparedSplit:
    """A decoded, materialised split ready for training, plus what was skipped on the way.
    `class_counts` are readable images per class (multi-label: images carrying the class);
    `unlabelled` counts readable multi-label images with no class at all."""

    dataset: Any
    num_rows: int
    class_counts: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    unlabelled: int = 0

    @property
    def label_cardinality(self) -> float:
        """Mean number of labels per readable image (1 for single-label data)."""
        return sum(self.class_counts.values()) / self.num_rows if self.num_rows else 0.0


def prepare_split(
    images: LabelledImages,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    decode_batch_size: int,
    seed: int,
    split_name: str,
    storage_config: StorageConfig | None = None,
    num_cpus: float | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> PreparedSplit:
    """Decode a split once into the object store at model resolution, dropping undecodable files.

    Training then iterates small uint8 arrays every epoch instead of re-reading and re-decoding
    every file; the decoded set is spilled to disk by Ray if it outgrows memory. Multi-label images
    carry a (classes,) float32 0/1 `label` vector, single-label ones an int32 class index.
    """
    from ray.data.expressions import col

    generator = np.random.default_rng(seed)
    order = generator.permutation(len(images.paths))  # Mix classes across blocks.
    shuffled = images.subset(order)
    with user_errors_from_ray():  # an endpoint that kept failing inside a decode task
        decoded = decoded_dataset(
            shuffled.paths, shuffled.label_matrix() if shuffled.multilabel else shuffled.label_indices(), image_size, channels, max_pixels, decode_batch_size,
            storage_config, num_cpus=num_cpus, max_bytes=max_bytes,
        ).materialize()  # fmt: skip
    skipped_rows = decoded.filter(expr=col("error") != "").select_columns(["path", "error"]).take_all()
    skipped = [{"path": str(row["path"]), "error": str(row["error"])} for row in skipped_rows]
    # `row` is a stable id per image: augmentation draws its random parameters from it.
    usable = decoded.filter(expr=col("error") == "").select_columns(["image", "label", "row"]).materialize()
    num_rows = usable.count()
    skipped_paths = {row["path"] for row in skipped}
    class_counts = {name: 0 for name in images.class_names}
    unlabelled = 0
    label_sets = shuffled.label_sets if shuffled.multilabel else [(label,) for label in shuffled.labels]
    for path, names in zip(shuffled.paths, label_sets):
        if path not in skipped_paths:
            unlabelled += not names
            for name in names:
                class_counts[name] += 1
    if skipped:
        logger.warning(
            "%s split: skipped %d unreadable image(s) of %d, e.g. %s (%s)",
            split_name,
            len(skipped),
            len(images.paths),
            skipped[0]["path"],
            skipped[0]["error"],
        )
    logger.info("%s split: %d images decoded to %dx%dx%d", split_name, num_rows, *image_size, channels)
    return PreparedSplit(dataset=usable, num_rows=num_rows, class_counts=class_counts, skipped=skipped, unlabelled=unlabelled)
