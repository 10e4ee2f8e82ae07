"""Labelled and unlabelled image listings: folders, bucket prefixes and manifests, one key per
image, and deterministic train/val splits. Imports neither TensorFlow nor Ray."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from imgcls.data.images import has_image_extension
from imgcls.errors import DataError, shorten
from imgcls.platform import storage

logger = logging.getLogger(__name__)


@dataclass
class ImageListing:
    """Image URIs found under a root, how many other files were passed over, and how many repeated
    manifest rows were dropped."""

    paths: list[str]
    ignored: int = 0
    duplicates: int = 0


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


def _is_hidden(relative: str) -> bool:
    """A path below the root with a `.x` or `_x` part. Object keys may hold the literal segments `.`,
    `..` and `` (from `//`): those are names like any other, not hidden ones."""
    return any(part.startswith((".", "_")) and part not in (".", "..") for part in relative.split("/"))


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
        if _is_hidden(relative) or not has_image_extension(relative.rsplit("/", 1)[-1]):
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
        paths, _, duplicates = read_manifest(uri, endpoint_url, require_label=False)
        return ImageListing(paths=paths, duplicates=duplicates)
    return list_images(uri, endpoint_url)


def _labelled_from_folder(uri: str, endpoint_url: str | None) -> LabelledImages:
    root = _image_root(uri, endpoint_url)
    paths: list[str] = []
    labels: list[str] = []
    ignored = 0
    for relative in storage.iter_files(root):
        parts = relative.split("/")
        if _is_hidden(relative) or not has_image_extension(parts[-1]) or len(parts) < 2:
            ignored += 1  # hidden, not an image, or not inside a class folder
            continue
        paths.append(root.join(relative).uri)
        labels.append(parts[0])
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return LabelledImages(
        paths=[paths[i] for i in order], labels=[labels[i] for i in order], class_names=[], ignored=ignored
    )


def read_manifest(
    uri: str, endpoint_url: str | None, require_label: bool
) -> tuple[list[str], list[str] | None, int]:
    """Rows of a CSV or Parquet manifest: `path` (absolute URI or relative to the manifest's folder)
    and, when required, `label`; returns paths, labels and the number of repeated rows dropped.

    Paths are normalised once (see `normalise_manifest_path`), so one image has one key; a row
    repeated with the same label is dropped and counted, the same path with two labels is an error.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    location = storage.resolve(uri, endpoint_url)
    _check_manifest_file(location, uri)
    try:
        with storage.user_facing_errors(location, "read the manifest"):
            if uri.lower().endswith(".csv"):
                with location.filesystem.open_input_stream(location.path) as stream:
                    table = pacsv.read_csv(
                        stream, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()})
                    )
            else:
                with location.filesystem.open_input_file(location.path) as handle:
                    table = pq.read_table(handle)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(f"Cannot read manifest {uri}: {shorten(str(error), 300)}") from None
    required = ["path", "label"] if require_label else ["path"]
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise DataError(f"Manifest {uri} lacks column(s) {missing}; it has {shorten(table.column_names)}.")
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
    paths = [normalise_manifest_path(raw, location) for raw in raw_paths]
    return _drop_repeated_rows(uri, paths, labels)


def _check_manifest_file(location: storage.Location, uri: str) -> None:
    if location.is_local:
        try:
            mode = os.stat(location.path).st_mode
        except (OSError, ValueError):
            raise DataError(f"Manifest {uri} does not exist.") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"Manifest {uri} is not a regular file (a named pipe, device, socket or folder).")
    elif not storage.is_file(location):
        raise DataError(f"Manifest {uri} does not exist.")


def normalise_manifest_path(raw: str, manifest: storage.Location) -> str:
    """The one key of a manifest row. Local paths become absolute with `.` and `..` resolved and a
    `file://` prefix removed; relative ones are beside the manifest. `s3://` URIs, and relative keys
    beside a manifest in a bucket, are used exactly as written: object keys are never normalised.
    Anything else (another scheme, a NUL byte) is kept as written and becomes that row's error."""
    if "\x00" in raw:
        return raw
    scheme, separator, rest = raw.partition("://")
    if separator:
        scheme = scheme.lower()
        if scheme in ("s3", "s3a"):
            return f"s3://{rest}"
        if scheme != "file":
            return raw
        raw = rest
    if not manifest.is_local and not raw.startswith("/"):
        return manifest.parent.join(raw).uri
    if not raw.startswith("/"):
        raw = os.path.join(manifest.parent.path, raw)
    return os.path.normpath(raw)


def _drop_repeated_rows(
    uri: str, paths: list[str], labels: list[str] | None
) -> tuple[list[str], list[str] | None, int]:
    first_label: dict[str, str | None] = {}
    kept_paths: list[str] = []
    kept_labels: list[str] = []
    conflicts: list[str] = []
    for row, path in enumerate(paths):
        label = labels[row] if labels is not None else None
        if path in first_label:
            if first_label[path] != label and len(conflicts) < 3:
                conflicts.append(f"{shorten(path, 120)} ({first_label[path]!r} and {shorten(label, 60)})")
            continue
        first_label[path] = label
        kept_paths.append(path)
        if labels is not None:
            kept_labels.append(label)
    if conflicts:
        raise DataError(
            f"Manifest {uri} gives one image two different labels: {'; '.join(conflicts)}. Keep one row per image."
        )
    duplicates = len(paths) - len(kept_paths)
    if duplicates:
        logger.warning("manifest %s: dropped %d repeated row(s) (the same image listed again)", uri, duplicates)
    return kept_paths, kept_labels if labels is not None else None, duplicates


def list_labelled(uri: str, endpoint_url: str | None = None) -> LabelledImages:
    """Labelled images from a folder per class (`root/<class>/**/<image>`) or a manifest."""
    if is_manifest(uri):
        paths, labels, _ = read_manifest(uri, endpoint_url, require_label=True)
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
