"""Which task a training run learns (`model.task` and the data decide), and the listings converted
to it. Plain Python on the driver: no TensorFlow, no Ray.

- auto: multi-label exactly when the training data is a manifest with a `labels` column.
- multilabel: single-label data (class folders, a `label` manifest) trains a sigmoid per class on
  one-element label sets.
- multiclass: a `labels` manifest is accepted only when every image carries exactly one label.
"""

from __future__ import annotations

from dataclasses import replace

from imgcls.data.listing import LabelledImages
from imgcls.errors import DataError


# What each kind of run reports per epoch (and `val_` + each with validation): multi-label runs have
# micro-F1 at threshold 0.5 and exact-set accuracy instead of accuracy.
SINGLE_LABEL_METRICS = ("loss", "accuracy")
MULTILABEL_METRICS = ("loss", "micro_f1", "exact_match")


def resolve_multilabel(requested: str, train_images: LabelledImages) -> bool:
    """True when the run trains a sigmoid per class."""
    if requested == "auto":
        return train_images.multilabel
    return requested == "multilabel"


def as_multilabel(images: LabelledImages) -> LabelledImages:
    """Single-label images as one-element label sets (multi-label ones unchanged)."""
    if images.multilabel:
        return images
    return replace(images, label_sets=[(label,) for label in images.labels])


def as_single_label(images: LabelledImages, where: str) -> LabelledImages:
    """Multi-label images as one class each, when every image carries exactly one; else DataError."""
    if not images.multilabel:
        return images
    empty = sum(1 for names in images.label_sets if not names)
    several = sum(1 for names in images.label_sets if len(names) > 1)
    if empty or several:
        raise DataError(
            f"model.task is multiclass but {where} is a multi-label manifest (a `labels` column) in which "
            f"{empty} of {len(images.paths)} image(s) have no label and {several} have two or more: multiclass "
            "needs exactly one label per image. Set model.task to multilabel (or auto), or give each image one label."
        )
    return replace(images, labels=[names[0] for names in images.label_sets], label_sets=None)


def conform(images: LabelledImages, multilabel: bool, where: str) -> LabelledImages:
    """`images` in the run's task's form."""
    return as_multilabel(images) if multilabel else as_single_label(images, where)
