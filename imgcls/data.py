"""Labelled image listing, train/val splits and the Ray Data decoding pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from imgcls import storage
from imgcls.errors import DataError
from imgcls.images import ImageDecodeError, decode_image, has_image_extension

logger = logging.getLogger(__name__)

# Rows per Ray Data block before decoding: several decode batches, so tasks are neither tiny nor huge.
ROWS_PER_BLOCK = 256


@dataclass
class ImageListing:
    """Image URIs found under a root, and how many other files were passed over."""

    paths: list[str]
    ignored: int = 0


@dataclass
class LabelledImages:
    """Image URIs with their class names, and the sorted class list that fixes label indices."""

    paths: list[str]
    labels: list[str]
    class_names: list[str]
    ignored: int = 0

    def label_indices(self) -> np.ndarray:
        index = {name: position for position, name in enumerate(self.class_names)}
        return np.array([index[label] for label in self.labels], dtype=np.int32)

    def subset(self, positions: np.ndarray) -> "LabelledImages":
        return LabelledImages(
            paths=[self.paths[i] for i in positions],
            labels=[self.labels[i] for i in positions],
            class_names=self.class_names,
        )

    def counts(self) -> dict[str, int]:
        counted = {name: 0 for name in self.class_names}
        for label in self.labels:
            counted[label] += 1
        return counted


def _is_hidden(relative: PurePosixPath) -> bool:
    return any(part.startswith(".") or part.startswith("_") for part in relative.parts)


def list_images(uri: str) -> ImageListing:
    """Every image file under `uri`, recursively, sorted; hidden and non-image files are counted, not used."""
    root = storage.resolve(uri)
    info = root.filesystem.get_file_info(root.path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"Image folder {uri} does not exist. Check the path (relative paths start at {root.path}).")
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{uri} is a file, not a folder of images.")
    paths: list[str] = []
    ignored = 0
    for entry in root.filesystem.get_file_info(pafs.FileSelector(root.path, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        relative = PurePosixPath(entry.path).relative_to(PurePosixPath(root.path))
        if _is_hidden(relative) or not has_image_extension(relative.name):
            ignored += 1
            continue
        paths.append(root.join(str(relative)).uri)
    paths.sort()
    return ImageListing(paths=paths, ignored=ignored)


def list_labelled_folder(uri: str) -> LabelledImages:
    """A folder per class: `root/<class>/**/<image>`. Files directly under root are ignored."""
    listing = list_images(uri)
    root = storage.resolve(uri)
    paths: list[str] = []
    labels: list[str] = []
    ignored = listing.ignored
    for path in listing.paths:
        relative = PurePosixPath(storage.resolve(path).path).relative_to(PurePosixPath(root.path))
        if len(relative.parts) < 2:
            ignored += 1
            continue
        paths.append(path)
        labels.append(relative.parts[0])
    class_names = sorted(set(labels))
    if not class_names:
        raise DataError(
            f"No labelled images found under {uri}: expected one sub-folder per class, each holding images "
            f"({', '.join(sorted(ext.lstrip('.') for ext in {'.jpg', '.png', '.bmp', '.gif', '.webp', '.tif'}))})."
        )
    if len(class_names) < 2:
        raise DataError(
            f"Only one class ('{class_names[0]}') found under {uri}: a classifier needs at least two class folders."
        )
    return LabelledImages(paths=paths, labels=labels, class_names=class_names, ignored=ignored)


def stratified_split(
    images: LabelledImages, val_fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages | None]:
    """Hold out `val_fraction` of every class, deterministically for a given seed.

    A class with a single image stays entirely in training; any class with two or more
    images gives at least one to validation so every class is measured.
    """
    if val_fraction <= 0:
        return images, None
    generator = np.random.default_rng(seed)
    labels = np.array(images.labels)
    train_positions: list[int] = []
    val_positions: list[int] = []
    for class_name in images.class_names:
        positions = np.flatnonzero(labels == class_name)
        positions = positions[generator.permutation(len(positions))]
        held_out = 0 if len(positions) < 2 else max(1, int(round(len(positions) * val_fraction)))
        held_out = min(held_out, len(positions) - 1)
        val_positions.extend(positions[:held_out].tolist())
        train_positions.extend(positions[held_out:].tolist())
    return images.subset(np.sort(train_positions)), images.subset(np.sort(val_positions))


def read_file_bytes(uri: str) -> bytes:
    location = storage.resolve(uri)
    with location.filesystem.open_input_stream(location.path) as stream:
        return stream.read()


def decode_batch(
    batch: dict[str, np.ndarray], image_size: tuple[int, int], channels: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """Ray Data UDF: read and decode every path in the batch; failures become an `error` string.

    Every row gets an image of the same shape (zeros on error), so Arrow never sees ragged arrays.
    """
    paths = batch["path"]
    height, width = image_size
    images = np.zeros((len(paths), height, width, channels), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for row, path in enumerate(paths):
        try:
            images[row] = decode_image(read_file_bytes(str(path)), image_size, channels, max_pixels)
        except ImageDecodeError as error:
            errors[row] = str(error)
        except OSError as error:
            errors[row] = f"cannot read file: {error}"
    output = dict(batch)
    output["image"] = images
    output["error"] = errors.astype(str)
    return output


def paths_table(paths: list[str], label_indices: np.ndarray | None = None) -> list[pa.Table]:
    """Split path rows into several Arrow tables so Ray Data can decode them in parallel."""
    tables = []
    for start in range(0, len(paths), ROWS_PER_BLOCK):
        columns: dict[str, Any] = {"path": pa.array(paths[start : start + ROWS_PER_BLOCK], pa.string())}
        if label_indices is not None:
            columns["label"] = pa.array(label_indices[start : start + ROWS_PER_BLOCK], pa.int32())
        tables.append(pa.table(columns))
    return tables


def decoded_dataset(
    paths: list[str],
    label_indices: np.ndarray | None,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    decode_batch_size: int,
):
    """A lazy Ray Dataset of path (+label), image and error columns."""
    import ray.data

    dataset = ray.data.from_arrow(paths_table(paths, label_indices))
    return dataset.map_batches(
        decode_batch,
        batch_size=decode_batch_size,
        batch_format="numpy",
        fn_kwargs={"image_size": tuple(image_size), "channels": channels, "max_pixels": max_pixels},
    )


@dataclass
class PreparedSplit:
    """A decoded, materialised split ready for training, plus what was skipped on the way."""

    dataset: Any
    num_rows: int
    class_counts: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)


def prepare_split(
    images: LabelledImages,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    decode_batch_size: int,
    seed: int,
    split_name: str,
) -> PreparedSplit:
    """Decode a split once into the object store at model resolution, dropping undecodable files.

    Training then iterates small uint8 arrays every epoch instead of re-reading and re-decoding
    every file; the decoded set is spilled to disk by Ray if it outgrows memory.
    """
    from ray.data.expressions import col

    generator = np.random.default_rng(seed)
    order = generator.permutation(len(images.paths))  # Mix classes across blocks.
    shuffled = images.subset(order)
    decoded = decoded_dataset(
        shuffled.paths, shuffled.label_indices(), image_size, channels, max_pixels, decode_batch_size
    ).materialize()
    skipped_rows = decoded.filter(expr=col("error") != "").select_columns(["path", "error"]).take_all()
    skipped = [{"path": str(row["path"]), "error": str(row["error"])} for row in skipped_rows]
    usable = decoded.filter(expr=col("error") == "").select_columns(["image", "label"]).materialize()
    num_rows = usable.count()
    skipped_paths = {row["path"] for row in skipped}
    class_counts = {name: 0 for name in images.class_names}
    for path, label in zip(shuffled.paths, shuffled.labels):
        if path not in skipped_paths:
            class_counts[label] += 1
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
    return PreparedSplit(dataset=usable, num_rows=num_rows, class_counts=class_counts, skipped=skipped)
