"""Tiny, learnable image data sets made on the fly for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pattern_image(class_index: int, size: int, generator: np.random.Generator) -> np.ndarray:
    """Class 0: horizontal stripes, class 1: vertical stripes, class 2: a bright centre square;
    plus noise, so the classes are learnable but not trivially identical images."""
    image = generator.integers(0, 60, size=(size, size, 3)).astype(np.int32)
    offset = int(generator.integers(0, 4))
    if class_index == 0:
        image[(np.arange(size) + offset) % 4 < 2, :, :] += 170
    elif class_index == 1:
        image[:, (np.arange(size) + offset) % 4 < 2, :] += 170
    else:
        quarter = size // 4
        image[quarter : size - quarter, quarter : size - quarter, :] += 170
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pattern_dataset(
    root: Path, per_class: int, num_classes: int = 2, size: int = 16, seed: int = 0, extension: str = "png"
) -> list[str]:
    """Write `root/<class>/<n>.<extension>`; returns the class names."""
    generator = np.random.default_rng(seed)
    class_names = ["horizontal", "vertical", "square"][:num_classes]
    for class_index, class_name in enumerate(class_names):
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            Image.fromarray(pattern_image(class_index, size, generator)).save(folder / f"{number:04d}.{extension}")
    return class_names
