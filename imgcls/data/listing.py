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
    """Image URIs with their class names, and the sorted class list that fixes label indices.

    Single-label images have one class name each in `labels`. Multi-label images (a manifest with a
    `labels` column) have a tuple of class names each, possibly empty, in `label_sets`; `labels` then
    holds each set joined with `|` (a key to stratify and count by, never a class name)."""

    paths: list[str]
    labels: list[str]
    class_names: list[str]
    ignored: int = 0
    label_sets: list[tuple[str, ...]] | None = None

    @property
    def multilabel(self) -> bool:
        return self.label_sets is not None

    def label_indices(self) -> np.ndarray:
        """Single-label: the class index of each image."""
        if self.multilabel:
            raise ValueError("multi-label images have a label matrix (label_matrix), not one index each")
        index = {name: position for position, name in enumerate(self.class_names)}
        return np.array([index[label] for label in self.labels], dtype=np.int32)

    def label_matrix(self) -> np.ndarray:
        """(images, classes) of 0/1 as float32: 1 where the image carries the class. Single-label
        images give one-hot rows."""
        index = {name: position for position, name in enumerate(self.class_names)}
        matrix = np.zeros((len(self.paths), len(self.class_names)), dtype=np.float32)
        sets = self.label_sets if self.multilabel else [(label,) for label in self.labels]
        for row, names in enumerate(sets):
            for name in names:
                matrix[row, index[name]] = 1.0
        return matrix

    def subset(self, positions: np.ndarray) -> "LabelledImages":
        return LabelledImages(
            paths=[self.paths[i] for i in positions],
            labels=[self.labels[i] for i in positions],
            class_names=self.class_names,
            label_sets=[self.label_sets[i] for i in positions] if self.multilabel else None,
        )

    def counts(self) -> dict[str, int]:
        """Images per class (for multi-label: images carrying each class)."""
        counted = {name: 0 for name in self.class_names}
        for names in self.label_sets if self.multilabel else [(label,) for label in self.labels]:
            for name in names:
                counted[name] += 1
        return counted

    def unlabelled_count(self) -> int:
        """Multi-label images that carry no class at all ("none of these")."""
        return sum(1 for names in self.label_sets if not names) if self.multilabel else 0


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
        rows = read_manifest(uri, endpoint_url, require_label=False)
        return ImageListing(paths=rows.paths, duplicates=rows.duplicates)
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


@dataclass
class ManifestRows:
    """A manifest's rows once normalised: one path per image, with its label (`label` column) or its
    label set (`labels` column, multi-label), and how many repeated rows were dropped."""

    paths: list[str]
    labels: list[str] | None = None
    label_sets: list[tuple[str, ...]] | None = None
    duplicates: int = 0


# In a CSV manifest's `labels` column, the class names of one image are separated by this.
LABEL_SEPARATOR = "|"


def read_manifest(uri: str, endpoint_url: str | None, require_label: bool) -> ManifestRows:
    """Rows of a CSV or Parquet manifest: `path` (absolute URI or relative to the manifest's folder)
    and, when required, `label` (one class per image) or `labels` (multi-label: CSV names separated
    by `|`, Parquet list<string>; empty or null means the image carries none of the classes).

    Paths are normalised once (see `normalise_manifest_path`), so one image has one key; a row
    repeated with the same label(s) is dropped and counted, the same path with two different ones is an error.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    location = storage.resolve(uri, endpoint_url)
    _check_manifest_file(location, uri)
    try:
        with storage.user_facing_errors(location, "read the manifest"):
            if uri.lower().endswith(".csv"):
                text_columns = {"path": pa.string(), "label": pa.string(), "labels": pa.string()}
                with location.filesystem.open_input_stream(location.path) as stream:
                    table = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(column_types=text_columns))
            else:
                with location.filesystem.open_input_file(location.path) as handle:
                    table = pq.read_table(handle)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(f"Cannot read manifest {uri}: {shorten(str(error), 300)}") from None
    columns = table.column_names
    if "path" not in columns:
        raise DataError(f"Manifest {uri} lacks column(s) ['path']; it has {shorten(columns)}.")
    if require_label and "label" in columns and "labels" in columns:
        raise DataError(
            f"Manifest {uri} has both a `label` column (one class per image) and a `labels` column "
            "(multi-label); keep the one that describes the data."
        )
    if require_label and "label" not in columns and "labels" not in columns:
        raise DataError(
            f"Manifest {uri} lacks column(s) ['label'] (or ['labels'] for multi-label); it has {shorten(columns)}."
        )
    raw_paths = table.column("path").cast(pa.string()).to_pylist()
    empty_rows = [row + 2 for row, path in enumerate(raw_paths) if not path]
    labels = label_sets = None
    if require_label and "label" in columns:
        labels = [None if label is None else str(label) for label in table.column("label").to_pylist()]
        empty_rows += [row + 2 for row, label in enumerate(labels) if label in (None, "")]
    elif require_label:
        label_sets = _label_sets(uri, table.column("labels"))
    if empty_rows:
        raise DataError(
            f"Manifest {uri} has {len(empty_rows)} row(s) with an empty path or label "
            f"(CSV lines {sorted(set(empty_rows))[:10]}). Fill them in or remove them."
        )
    paths = [normalise_manifest_path(raw, location) for raw in raw_paths]
    return _drop_repeated_rows(uri, paths, labels, label_sets)


def _label_sets(uri: str, column: pa.ChunkedArray) -> list[tuple[str, ...]]:
    """Each row's class names, sorted and without repeats: from `a|b` text or a list<string> cell."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        cells = [[] if cell is None else cell for cell in column.to_pylist()]
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        cells = [[] if not cell else cell.split(LABEL_SEPARATOR) for cell in column.to_pylist()]
    else:
        raise DataError(
            f"Manifest {uri}: the `labels` column is {column.type}; it must hold text (`cat|dog`) or, "
            "in Parquet, a list of strings."
        )
    sets: list[tuple[str, ...]] = []
    bad_rows: list[int] = []
    for row, cell in enumerate(cells):
        names = [None if name is None else str(name).strip() for name in cell]
        if any(not name for name in names):
            bad_rows.append(row + 2)
            names = [name for name in names if name]
        sets.append(tuple(sorted(set(names))))
    if bad_rows:
        raise DataError(
            f"Manifest {uri} has {len(bad_rows)} row(s) whose `labels` hold an empty class name "
            f"(CSV lines {bad_rows[:10]}, e.g. `a||b` or a trailing `|`). An image with no labels has an empty cell."
        )
    return sets


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
    uri: str, paths: list[str], labels: list[str] | None, label_sets: list[tuple[str, ...]] | None = None
) -> ManifestRows:
    values = labels if labels is not None else label_sets
    first_value: dict[str, object] = {}
    kept: list[int] = []
    conflicts: list[str] = []
    for row, path in enumerate(paths):
        value = values[row] if values is not None else None
        if path in first_value:
            if first_value[path] != value and len(conflicts) < 3:
                conflicts.append(f"{shorten(path, 120)} ({_shown(first_value[path])} and {_shown(value)})")
            continue
        first_value[path] = value
        kept.append(row)
    if conflicts:
        what = "labels" if labels is not None else "label sets"
        raise DataError(f"Manifest {uri} gives one image two different {what}: {'; '.join(conflicts)}. Keep one row per image.")
    duplicates = len(paths) - len(kept)
    if duplicates:
        logger.warning("manifest %s: dropped %d repeated row(s) (the same image listed again)", uri, duplicates)
    return ManifestRows(
        paths=[paths[row] for row in kept],
        labels=[labels[row] for row in kept] if labels is not None else None,
        label_sets=[label_sets[row] for row in kept] if label_sets is not None else None,
        duplicates=duplicates,
    )


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return shorten(LABEL_SEPARATOR.join(value), 60) if value else "no labels"
    return repr(value) if value is None else shorten(value, 60)


def list_labelled(uri: str, endpoint_url: str | None = None) -> LabelledImages:
    """Labelled images from a folder per class (`root/<class>/**/<image>`) or a manifest (with a
    `label` column, or a `labels` column for multi-label images)."""
    if is_manifest(uri):
        rows = read_manifest(uri, endpoint_url, require_label=True)
        if rows.label_sets is not None:
            images = LabelledImages(
                paths=rows.paths, labels=[LABEL_SEPARATOR.join(names) for names in rows.label_sets],
                class_names=[], label_sets=rows.label_sets,
            )  # fmt: skip
        else:
            images = LabelledImages(paths=rows.paths, labels=rows.labels or [], class_names=[])
    else:
        images = _labelled_from_folder(uri, endpoint_url)
    if images.multilabel:
        images.class_names = sorted({name for names in images.label_sets for name in names})
    else:
        images.class_names = sorted(set(images.labels))
    if not images.class_names:
        raise DataError(
            f"No labelled images found under {uri}: expected one sub-folder per class, each holding images "
            "(jpg, jpeg, png, bmp, gif, webp, tif, tiff), or a CSV/Parquet manifest with path,label columns "
            "(or path,labels for multi-label images)."
        )
    if len(images.class_names) < 2:
        raise DataError(
            f"Only one class ('{images.class_names[0]}') found in {uri}: a classifier needs at least two classes."
        )
    return images


def check_known_classes(images: LabelledImages, known: list[str], where: str, what_knows: str) -> None:
    """DataError naming the class(es) in `images` that `known` lacks (a validation set or an
    evaluation set with a label the model was never trained on)."""
    unknown = sorted(set(images.class_names) - set(known))
    if unknown:
        raise DataError(
            f"{where} has class(es) {shorten(unknown, 300)} that {what_knows} does not know "
            f"(it knows {shorten(known, 300)}). Use only the classes the model is trained on."
        )


def stratified_split(
    images: LabelledImages, val_fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages | None]:
    """Hold out `val_fraction` of every class, deterministically for a given seed.

    A class with a single image stays entirely in training; any class with two or more
    images gives at least one to validation so every class is measured. Multi-label images are
    stratified by their whole label set (`labels` holds it as one key).
    """
    if val_fraction <= 0:
        return images, None
    generator = np.random.default_rng(seed)
    labels = np.array(images.labels)
    train_positions: list[int] = []
    val_positions: list[int] = []
    for class_name in sorted(set(images.labels)):
        positions = np.flatnonzero(labels == class_name)
        positions = positions[generator.permutation(len(positions))]
        held_out = 0 if len(positions) < 2 else max(1, int(round(len(positions) * val_fraction)))
        held_out = min(held_out, len(positions) - 1)
        val_positions.extend(positions[:held_out].tolist())
        train_positions.extend(positions[held_out:].tolist())
    return images.subset(np.sort(train_positions)), images.subset(np.sort(val_positions))
