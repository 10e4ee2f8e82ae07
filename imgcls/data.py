"""Labelled image listing, train/val splits and the Ray Data decoding pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
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


MANIFEST_SUFFIXES = (".csv", ".parquet")


def _is_hidden(relative: PurePosixPath) -> bool:
    return any(part.startswith(".") or part.startswith("_") for part in relative.parts)


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def _image_root(uri: str, endpoint_url: str | None) -> storage.Location:
    root = storage.resolve(uri, endpoint_url)
    if root.is_local:
        info = root.filesystem.get_file_info(root.path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"Image folder {uri} does not exist. Check the path (it resolved to {root.path}).")
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri} is a file, not a folder of images (manifests end in .csv or .parquet).")
    return root


def list_images(uri: str, endpoint_url: str | None = None) -> ImageListing:
    """Every image under `uri` (a folder or bucket prefix), recursively, sorted. Hidden files and
    folders (`.x`, `_x`) and files without an image extension are counted, not used."""
    root = _image_root(uri, endpoint_url)
    paths: list[str] = []
    ignored = 0
    for relative in storage.iter_files(root):
        relative_path = PurePosixPath(relative)
        if _is_hidden(relative_path) or not has_image_extension(relative_path.name):
            ignored += 1
            continue
        paths.append(root.join(relative).uri)
    if not root.is_local and not paths and not ignored:
        raise DataError(f"Nothing found under {uri}: check the bucket, the prefix and storage.endpoint_url.")
    paths.sort()
    return ImageListing(paths=paths, ignored=ignored)


def list_prediction_inputs(uri: str, endpoint_url: str | None = None) -> ImageListing:
    """Images to classify: a folder or bucket prefix (recursive), or a manifest with a `path` column."""
    if is_manifest(uri):
        paths, _ = read_manifest(uri, endpoint_url, require_label=False)
        return ImageListing(paths=paths)
    return list_images(uri, endpoint_url)


def _labelled_from_folder(uri: str, endpoint_url: str | None) -> LabelledImages:
    root = _image_root(uri, endpoint_url)
    paths: list[str] = []
    labels: list[str] = []
    ignored = 0
    for relative in storage.iter_files(root):
        relative_path = PurePosixPath(relative)
        if _is_hidden(relative_path) or not has_image_extension(relative_path.name) or len(relative_path.parts) < 2:
            ignored += 1  # hidden, not an image, or not inside a class folder
            continue
        paths.append(root.join(relative).uri)
        labels.append(relative_path.parts[0])
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return LabelledImages(
        paths=[paths[i] for i in order], labels=[labels[i] for i in order], class_names=[], ignored=ignored
    )


def read_manifest(uri: str, endpoint_url: str | None, require_label: bool) -> tuple[list[str], list[str] | None]:
    """Rows of a CSV or Parquet manifest: `path` (absolute URI or relative to the manifest's folder)
    and, when required, `label`."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    location = storage.resolve(uri, endpoint_url)
    if not storage.is_file(location):
        raise DataError(f"Manifest {uri} does not exist.")
    try:
        if uri.lower().endswith(".csv"):
            with location.filesystem.open_input_stream(location.path) as stream:
                table = pacsv.read_csv(
                    stream, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()})
                )
        else:
            with location.filesystem.open_input_file(location.path) as handle:
                table = pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"Cannot read manifest {uri}: {error}") from None
    required = ["path", "label"] if require_label else ["path"]
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise DataError(f"Manifest {uri} lacks column(s) {missing}; it has {table.column_names}.")
    raw_paths = table.column("path").cast(pa.string()).to_pylist()
    labels = [None if label is None else str(label) for label in table.column("label").to_pylist()] if require_label else None
    empty_rows = [row + 2 for row, path in enumerate(raw_paths) if not path]
    if require_label:
        empty_rows += [row + 2 for row, label in enumerate(labels) if label in (None, "")]
    if empty_rows:
        raise DataError(
            f"Manifest {uri} has {len(empty_rows)} row(s) with an empty path or label "
            f"(CSV lines {sorted(set(empty_rows))[:10]}). Fill them in or remove them."
        )
    # Absolute URIs and absolute local paths stand as they are; anything else is beside the manifest.
    paths = [raw if "://" in raw or raw.startswith("/") else location.parent.join(raw).uri for raw in raw_paths]
    return paths, labels


def list_labelled(uri: str, endpoint_url: str | None = None) -> LabelledImages:
    """Labelled images from a folder per class (`root/<class>/**/<image>`) or a manifest."""
    if is_manifest(uri):
        paths, labels = read_manifest(uri, endpoint_url, require_label=True)
        images = LabelledImages(paths=paths, labels=labels or [], class_names=[])
    else:
        images = _labelled_from_folder(uri, endpoint_url)
    images.class_names = sorted(set(images.labels))
    if not images.class_names:
        raise DataError(
            f"No labelled images found under {uri}: expected one sub-folder per class, each holding images "
            "(jpg, jpeg, png, bmp, gif, webp, tif, tiff), or a CSV/Parquet manifest with path,label columns."
        )
    if len(images.class_names) < 2:
        raise DataError(
            f"Only one class ('{images.class_names[0]}') found in {uri}: a classifier needs at least two classes."
        )
    return images


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


# Concurrent object reads per decode task: fetching from an object store is latency-bound.
REMOTE_READ_THREADS = 16


def _read_each(paths: list[str], endpoint_url: str | None) -> Iterator[bytes | OSError]:
    """Bytes of every path in order, or the OSError that reading it raised. Remote objects are fetched
    concurrently (and held until decoded); local files one at a time as they are decoded, so a block
    never holds all its encoded files at once (1,024 JPEGs of 640x480 are about 80 MB)."""

    def read_one(path: str) -> bytes | OSError:
        try:
            if os.path.isabs(path):  # listed local files: skip resolving a filesystem per file
                with open(path, "rb") as handle:
                    return handle.read()
            return storage.read_object(storage.resolve(path, endpoint_url))
        except OSError as error:
            return error

    if paths and "://" in paths[0]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(paths))) as pool:
            yield from pool.map(read_one, paths)
        return
    for path in paths:
        yield read_one(path)


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    endpoint_url: str | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: read and decode every path in the batch; failures become an `error` string.

    Every row gets an image of the same shape (zeros on error), so Arrow never sees ragged arrays.
    """
    paths = [str(path) for path in batch["path"]]
    height, width = image_size
    images = np.zeros((len(paths), height, width, channels), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for row, payload in enumerate(_read_each(paths, endpoint_url)):
        if isinstance(payload, OSError):
            errors[row] = f"cannot read file: {payload}"
            continue
        try:
            images[row] = decode_image(payload, image_size, channels, max_pixels)
        except ImageDecodeError as error:
            errors[row] = str(error)
    output = dict(batch)
    output["image"] = images
    output["error"] = errors.astype(str)
    return output


def paths_table(
    paths: list[str], label_indices: np.ndarray | None = None, rows_per_block: int = ROWS_PER_BLOCK
) -> list[pa.Table]:
    """Split path rows into several Arrow tables so Ray Data can decode them in parallel."""
    tables = []
    for start in range(0, len(paths), rows_per_block):
        stop = min(start + rows_per_block, len(paths))
        columns: dict[str, Any] = {
            "path": pa.array(paths[start:stop], pa.string()),
            "row": pa.array(np.arange(start, stop), pa.int64()),
        }
        if label_indices is not None:
            columns["label"] = pa.array(label_indices[start:stop], pa.int32())
        tables.append(pa.table(columns))
    return tables


def decoded_dataset(
    paths: list[str],
    label_indices: np.ndarray | None,
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    decode_batch_size: int,
    endpoint_url: str | None = None,
    num_cpus: float | None = None,
    rows_per_block: int = ROWS_PER_BLOCK,
):
    """A lazy Ray Dataset of path (+label), image and error columns; one decode task per block."""
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
            "endpoint_url": endpoint_url,
        },
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
    endpoint_url: str | None = None,
    num_cpus: float | None = None,
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
        shuffled.paths, shuffled.label_indices(), image_size, channels, max_pixels, decode_batch_size, endpoint_url,
        num_cpus=num_cpus,
    ).materialize()  # fmt: skip
    skipped_rows = decoded.filter(expr=col("error") != "").select_columns(["path", "error"]).take_all()
    skipped = [{"path": str(row["path"]), "error": str(row["error"])} for row in skipped_rows]
    # `row` is a stable id per image: augmentation draws its random parameters from it.
    usable = decoded.filter(expr=col("error") == "").select_columns(["image", "label", "row"]).materialize()
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
