"""Build a real image data set from scikit-learn's bundled handwritten digits (no download).

1,797 8x8 greyscale digits are upscaled to PNG files, one folder per class:
    OUT/train/<digit>/<n>.png   about 80% of every class
    OUT/test/<digit>/<n>.png    a fixed, stratified 20% held out for measuring accuracy
Usage: python examples/make_digits_dataset.py [--output examples/data/digits] [--size 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

TEST_FRACTION = 0.2
SPLIT_SEED = 1797


def split_positions(targets: np.ndarray) -> dict[int, tuple[list[int], list[int]]]:
    """Per digit: (train positions, test positions), the test ones a fixed 20% of that digit.
    examples/make_multilabel_dataset.py uses the same split, so its test canvases hold only test digits."""
    generator = np.random.default_rng(SPLIT_SEED)
    split = {}
    for digit in range(10):
        positions = np.flatnonzero(targets == digit)
        positions = positions[generator.permutation(len(positions))]
        held_out = int(round(len(positions) * TEST_FRACTION))
        split[digit] = (positions[held_out:].tolist(), positions[:held_out].tolist())
    return split


def digit_image(pixels_8x8: np.ndarray, size: int) -> Image.Image:
    """Dark ink on white paper, as a scanned digit would look; values 0-16 become 0-255."""
    pixels = (255 - pixels_8x8 * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)


def write_digits(output: Path, size: int) -> dict[str, int]:
    digits = load_digits()
    counts = {"train": 0, "test": 0}
    for digit, (train_positions, test_positions) in split_positions(digits.target).items():
        held_out = set(test_positions)
        for position in test_positions + train_positions:
            split = "test" if position in held_out else "train"
            image = digit_image(digits.images[position], size)
            folder = output / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{position:04d}.png")
            counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="examples/data/digits", help="Destination folder.")
    parser.add_argument("--size", type=int, default=32, help="Side of the square PNGs in pixels.")
    arguments = parser.parse_args()
    counts = write_digits(Path(arguments.output), arguments.size)
    print(f"wrote {counts['train']} train and {counts['test']} test digits to {arguments.output}")


if __name__ == "__main__":
    main()
