"""What is observed per image, the same way on the validation split (the reference profile) and in
every bulk run: uncertainty from the class probabilities, simple statistics of the decoded pixels,
and the model's penultimate features projected to a few dimensions. Pure numpy, no TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Scalar signals, in the order the run record and the profile list them.
IMAGE_STATISTICS = ("brightness", "contrast", "colourfulness", "width", "height")
MODEL_STATISTICS = ("score", "margin", "entropy")
# Pixel statistics are computed on at most about this many points per side: a strided sample of the
# decoded image, cheap beside the model and the same for the reference and every run.
STATISTICS_SIDE = 64


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per image (binary models: |2p - 1| from the two classes)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[1] < 2:
        raise ValueError("margins need at least two class probabilities per image")
    top_two = -np.partition(-probabilities, 1, axis=1)[:, :2]
    return top_two[:, 0] - top_two[:, 1]


def _plogp(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, values * np.log(np.where(values > 0, values, 1.0)), 0.0)


def entropies(probabilities: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Uncertainty per image in 0..1. Single-label: the Shannon entropy of the class distribution
    divided by log(K), so 1 is uniform over all K classes. Multi-label: the mean over classes of each
    sigmoid's binary entropy in bits (1 when every class sits at 0.5)."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if multilabel:
        binary = -(_plogp(probabilities) + _plogp(1.0 - probabilities)) / np.log(2.0)
        return binary.mean(axis=1)
    classes = probabilities.shape[1]
    return np.clip(-_plogp(probabilities).sum(axis=1) / np.log(classes), 0.0, 1.0)


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Brightness (mean luma), contrast (RMS: the luma's standard deviation) and colourfulness
    (Hasler and Suesstrunk's metric; 0 for greyscale), each scaled to 0..1 by 255, of uint8 images
    (batch, height, width, channels) as decoded for the model."""
    images = np.asarray(images)
    step_y = max(1, images.shape[1] // STATISTICS_SIDE)
    step_x = max(1, images.shape[2] // STATISTICS_SIDE)
    sample = images[:, ::step_y, ::step_x, :].astype(np.float32)
    count = len(images)
    if sample.shape[-1] == 3:
        red, green, blue = sample[..., 0], sample[..., 1], sample[..., 2]
        luma = 0.299 * red + 0.587 * green + 0.114 * blue
        red_green = (red - green).reshape(count, -1)
        yellow_blue = (0.5 * (red + green) - blue).reshape(count, -1)
        colourfulness = np.sqrt(red_green.var(axis=1) + yellow_blue.var(axis=1)) + 0.3 * np.sqrt(
            red_green.mean(axis=1) ** 2 + yellow_blue.mean(axis=1) ** 2
        )
    else:
        luma = sample[..., 0]
        colourfulness = np.zeros(count, dtype=np.float32)
    luma = luma.reshape(count, -1)
    return {
        "brightness": (luma.mean(axis=1) / 255.0).astype(np.float64),
        "contrast": (luma.std(axis=1) / 255.0).astype(np.float64),
        "colourfulness": (colourfulness / 255.0).astype(np.float64),
    }


@dataclass
class Observations:
    """Per-image values of readable images: the top-1 class index, score, margin and entropy, the
    image statistics, and (when the model has a penultimate layer and a projection) its projected
    features."""

    top_class: np.ndarray
    scalars: dict[str, np.ndarray]
    embedding: np.ndarray | None = None
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.top_class)

    @classmethod
    def empty(cls, projected_dimensions: int | None) -> "Observations":
        names = (*MODEL_STATISTICS, *IMAGE_STATISTICS)
        embedding = None if projected_dimensions is None else np.zeros((0, projected_dimensions))
        return cls(np.zeros(0, dtype=np.int64), {name: np.zeros(0) for name in names}, embedding)

    @classmethod
    def concatenate(cls, parts: list["Observations"]) -> "Observations":
        first = parts[0]
        embedding = None if first.embedding is None else np.concatenate([part.embedding for part in parts])
        scalars = {name: np.concatenate([part.scalars[name] for part in parts]) for name in first.scalars}
        return cls(np.concatenate([part.top_class for part in parts]), scalars, embedding)


def observe(
    probabilities: np.ndarray,
    images: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    multilabel: bool,
    embedding: np.ndarray | None = None,
) -> Observations:
    """Observations of readable images from their class probabilities (one per class, as
    `imgcls.inference.predictor.class_probabilities` gives them), decoded pixels and original sizes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    scalars = {
        "score": probabilities.max(axis=1),
        "margin": margins(probabilities),
        "entropy": entropies(probabilities, multilabel),
        **image_statistics(images),
        "width": np.asarray(widths, dtype=np.float64),
        "height": np.asarray(heights, dtype=np.float64),
    }
    return Observations(probabilities.argmax(axis=1), scalars, None if embedding is None else np.asarray(embedding, np.float64))
