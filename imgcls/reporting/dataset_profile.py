"""What a labelled set holds, from what evaluation decoded of it (`dataset_profile.json`): images
listed and readable, class balance, the images' own sizes, and exact duplicates by content hash,
above all copies of the same bytes that carry different labels."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

DATASET_PROFILE_FILE = "dataset_profile.json"
CLASS_BALANCE_FIGURE = "class_balance.png"
# Bounds on what the profile lists, so that it stays readable for a set of millions of images.
LISTED_GROUPS = 10
LISTED_COPIES = 5
COMMON_SIZES = 5
# The report names every class up to this many, otherwise the largest and the smallest few.
REPORT_CLASSES = 10
REPORT_CONFLICTS = 3


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassShare(Record):
    images: int = Field(description="Images of the class (multi-label: images carrying it), unreadable ones included.")
    share: float = Field(description="images over the images listed, 0-1 (multi-label shares may sum above 1).")


class Spread(Record):
    """Quantiles and range of one quantity over the readable images; all null when none is readable."""

    p05: float | None = None
    p50: float | None = None
    p95: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: np.ndarray) -> "Spread":
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls()
        p05, p50, p95 = (round(float(value), 4) for value in np.quantile(values, [0.05, 0.50, 0.95]))
        return cls(p05=p05, p50=p50, p95=p95, min=round(float(values.min()), 4), max=round(float(values.max()), 4))


class SizeCount(Record):
    width: int = Field(description="Pixels, as stored in the file (before EXIF orientation).")
    height: int = Field(description="Pixels, as stored in the file.")
    images: int


class ImageSizes(Record):
    width: Spread = Field(description="Pixels.")
    height: Spread = Field(description="Pixels.")
    aspect_ratio: Spread = Field(description="Width over height.")
    most_common: list[SizeCount] = Field(description=f"The {COMMON_SIZES} most common sizes, most images first.")


class Copy(Record):
    path: str
    labels: list[str] = Field(description="The copy's class (multi-label: its classes, possibly none).")


class DuplicateGroup(Record):
    content_digest: str = Field(description="BLAKE2b (16 bytes, hex) of the files' bytes.")
    images: int = Field(description="Copies in the set, all of them.")
    label_conflict: bool = Field(description="Its copies carry different labels.")
    copies: list[Copy] = Field(description=f"At most {LISTED_COPIES}: one per distinct label first, then by path.")


class Duplicates(Record):
    """Files whose bytes are identical, unreadable ones included when their bytes were read."""

    groups: int = Field(description="Digests held by more than one image.")
    images: int = Field(description="Images in those groups (each copy counts).")
    largest_groups: list[DuplicateGroup] = Field(description=f"At most {LISTED_GROUPS}, most copies first.")
    label_conflicts: int = Field(description="Groups whose copies carry different labels: the same bytes labelled differently.")
    images_in_label_conflicts: int
    label_conflict_groups: list[DuplicateGroup] = Field(description=f"At most {LISTED_GROUPS}, most copies first.")


class DatasetProfile(Record):
    """dataset_profile.json."""

    format_version: int = 1
    labels: Literal["single", "multi"] = Field(description="One class per image, or a set per image (a `labels` column).")
    images: int = Field(description="Images listed.")
    readable: int
    unreadable: int
    class_balance: dict[str, ClassShare] = Field(description="Every class of the model, in its order.")
    imbalance_ratio: float | None = Field(description="Largest class over the smallest non-empty one; null when all are empty.")
    classes_without_images: list[str]
    images_without_labels: int | None = Field(default=None, description="Multi-label only: images carrying no class.")
    mean_labels_per_image: float | None = Field(default=None, description="Multi-label only: over the images listed.")
    image_sizes: ImageSizes = Field(description="Over the readable images.")
    duplicates: Duplicates


def profile_dataset(
    paths: list[str], label_sets: list[tuple[str, ...]], multilabel: bool, class_names: list[str], decoded: pa.Table
) -> DatasetProfile:
    """The profile of the listed images (`paths` with each one's classes in `label_sets`) from their
    decoded rows (`decoded`: path, error, original_width, original_height, content_digest; any order)."""
    row_of = {path: row for row, path in enumerate(decoded.column("path").to_pylist())}
    order = [row_of[path] for path in paths]
    errors = decoded.column("error").to_pylist()
    readable = np.array([errors[row] is None for row in order], dtype=bool)
    widths = decoded.column("original_width").to_numpy(zero_copy_only=False)[order][readable]
    heights = decoded.column("original_height").to_numpy(zero_copy_only=False)[order][readable]
    digests = decoded.column("content_digest").to_pylist()
    counts = Counter(name for names in label_sets for name in names)
    images = len(paths)
    balance = {name: ClassShare(images=counts[name], share=round(counts[name] / images, 6) if images else 0.0)
               for name in class_names}  # fmt: skip
    present = [counts[name] for name in class_names if counts[name]]
    labels_carried = sum(len(names) for names in label_sets)
    return DatasetProfile(
        labels="multi" if multilabel else "single",
        images=images,
        readable=int(readable.sum()),
        unreadable=int((~readable).sum()),
        class_balance=balance,
        imbalance_ratio=round(max(present) / min(present), 4) if present else None,
        classes_without_images=[name for name in class_names if not counts[name]],
        image_sizes=_image_sizes(widths, heights),
        duplicates=_duplicates(paths, label_sets, [digests[row] for row in order]),
        images_without_labels=sum(1 for names in label_sets if not names) if multilabel else None,
        mean_labels_per_image=(round(labels_carried / images, 6) if images else 0.0) if multilabel else None,
    )


def _image_sizes(widths: np.ndarray, heights: np.ndarray) -> ImageSizes:
    common = Counter(zip(widths.tolist(), heights.tolist())).most_common()
    # Most images first, ties by size, so that the listing does not depend on the order of the rows.
    common.sort(key=lambda item: (-item[1], item[0]))
    return ImageSizes(
        width=Spread.of(widths),
        height=Spread.of(heights),
        aspect_ratio=Spread.of(widths / np.maximum(heights, 1)),
        most_common=[SizeCount(width=width, height=height, images=count) for (width, height), count in common[:COMMON_SIZES]],
    )


def _duplicates(paths: list[str], label_sets: list[tuple[str, ...]], digests: list[str]) -> Duplicates:
    members: dict[str, list[int]] = defaultdict(list)
    for position, digest in enumerate(digests):
        if digest:  # "" is a file whose bytes were never read
            members[digest].append(position)
    groups = []
    for digest, positions in members.items():
        if len(positions) < 2:
            continue
        distinct = {tuple(sorted(label_sets[position])) for position in positions}
        groups.append((digest, positions, len(distinct) > 1))
    groups.sort(key=lambda group: (-len(group[1]), min(paths[position] for position in group[1])))
    conflicts = [group for group in groups if group[2]]
    return Duplicates(
        groups=len(groups),
        images=sum(len(positions) for _, positions, _ in groups),
        largest_groups=[_group(group, paths, label_sets) for group in groups[:LISTED_GROUPS]],
        label_conflicts=len(conflicts),
        images_in_label_conflicts=sum(len(positions) for _, positions, _ in conflicts),
        label_conflict_groups=[_group(group, paths, label_sets) for group in conflicts[:LISTED_GROUPS]],
    )


def _group(group: tuple[str, list[int], bool], paths: list[str], label_sets: list[tuple[str, ...]]) -> DuplicateGroup:
    digest, positions, conflict = group
    by_path = sorted(positions, key=lambda position: paths[position])
    # One copy of each distinct label first, so that a conflict shows its labels whatever its size.
    first_of_label: dict[tuple[str, ...], int] = {}
    for position in by_path:
        first_of_label.setdefault(tuple(sorted(label_sets[position])), position)
    shown = list(first_of_label.values()) + [position for position in by_path if position not in first_of_label.values()]
    copies = [Copy(path=paths[position], labels=sorted(label_sets[position])) for position in shown[:LISTED_COPIES]]
    return DuplicateGroup(content_digest=digest, images=len(positions), label_conflict=conflict, copies=copies)


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _size(spread: Spread, digits: int = 0) -> str:
    values = (spread.p05, spread.p50, spread.p95)
    return "n/a" if spread.p50 is None else "/".join(f"{value:.{digits}f}" for value in values)


def _labels(labels: list[str]) -> str:
    return "|".join(labels) if labels else "no label"


def summary_line(profile: DatasetProfile) -> str:
    """The profile in one log line."""
    duplicates = profile.duplicates
    ratio = "n/a" if profile.imbalance_ratio is None else f"{profile.imbalance_ratio:.2f}"
    sizes = ", ".join(f"{size.width}x{size.height} ({size.images})" for size in profile.image_sizes.most_common[:2])
    return (
        f"dataset: {profile.images} images ({profile.readable} readable, {profile.unreadable} unreadable), "
        f"{len(profile.class_balance)} classes, imbalance {ratio}, {len(profile.classes_without_images)} without images; "
        f"sizes {sizes or 'n/a'}; {duplicates.groups} duplicate groups ({duplicates.images} images), "
        f"{duplicates.label_conflicts} label conflicts"
    )


def dataset_markdown(profile: DatasetProfile) -> list[str]:
    """The report's "## Dataset" section."""
    balance = profile.class_balance
    shown = {name: f"{name} {counted.images} ({_percent(counted.share)})" for name, counted in balance.items()}
    classes = ", ".join(shown.values())
    if len(shown) > REPORT_CLASSES:
        ranked = sorted(shown, key=lambda name: -balance[name].images)
        classes = "largest " + ", ".join(shown[name] for name in ranked[:3]) + "; smallest " + ", ".join(
            shown[name] for name in ranked[-3:])  # fmt: skip
    ratio = "n/a" if profile.imbalance_ratio is None else f"{profile.imbalance_ratio:.2f}"
    without = ", ".join(profile.classes_without_images) or "none"
    sizes = profile.image_sizes
    common = ", ".join(f"{size.width}x{size.height} ({size.images})" for size in sizes.most_common) or "n/a"
    duplicates = profile.duplicates
    lines = [
        "## Dataset",
        "",
        f"- images: {profile.images} listed, {profile.readable} readable, {profile.unreadable} unreadable",
        f"- classes{' (images carrying each)' if profile.labels == 'multi' else ''}: {classes}",
        f"- imbalance (largest over smallest non-empty class): {ratio}; classes without images: {without}",
    ]
    if profile.labels == "multi":
        lines.append(f"- images without labels: {profile.images_without_labels}; labels per image: "
                     f"{profile.mean_labels_per_image:.3f}")  # fmt: skip
    lines += [
        f"- sizes: {common}; width p05/p50/p95 {_size(sizes.width)}, height {_size(sizes.height)}, "
        f"aspect ratio {_size(sizes.aspect_ratio, 2)}",
        f"- exact duplicates: {duplicates.groups} groups ({duplicates.images} images); label conflicts (the same "
        f"bytes labelled differently): {duplicates.label_conflicts} groups ({duplicates.images_in_label_conflicts} images)",
    ]
    for group in duplicates.label_conflict_groups[:REPORT_CONFLICTS]:
        lines.append("  - " + ", ".join(f"`{copy.path}` ({_labels(copy.labels)})" for copy in group.copies))
    lines += [
        "",
        f"![class balance]({CLASS_BALANCE_FIGURE})",
        "",
        f"All numbers, and the duplicate groups with example paths, in [{DATASET_PROFILE_FILE}]({DATASET_PROFILE_FILE}).",
        "",
    ]
    return lines
