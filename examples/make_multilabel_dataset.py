"""Build a real multi-label image set from scikit-learn's bundled handwritten digits (no download).

Each canvas is 24x48 greyscale paper with two 24x24 slots, left and right. A canvas holds two
different digits (one per slot), one digit (in a random slot), or none at all. Its labels are the digits it shows, so the classes are "0".."9"
and an image carries 0, 1 or 2 of them.

    OUT/train/<n>.png, OUT/train.csv, OUT/train.parquet   canvases of training digits only
    OUT/test/<n>.png,  OUT/test.csv,  OUT/test.parquet    canvases of the held-out digits only

The held-out digits are exactly the test digits of examples/make_digits_dataset.py (a fixed 20% of
every class), so no test canvas shows a digit seen in training. Manifests: CSV `path,labels` with the
labels joined by `|` (an empty cell for an empty canvas), and the same as Parquet with a
list<string> `labels` column.

Usage: python examples/make_multilabel_dataset.py [--output examples/data/digits_multilabel]
           [--train-canvases 6000] [--test-canvases 800]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_digits_dataset import digit_image, split_positions  # noqa: E402  (the same held-out digits)

CANVAS_HEIGHT, CANVAS_WIDTH = 24, 48
# The digit fills its slot: at this size a small random offset costs the tutorial CNN (whose dense
# layer sees fixed positions) several points of held-out F1.
DIGIT_SIDE = 24
JITTER = CANVAS_HEIGHT - DIGIT_SIDE  # pixels of random offset each way (0: none)
# Share of canvases with no digit, one digit and two different digits.
DIGITS_PER_CANVAS = {0: 0.1, 1: 0.4, 2: 0.5}
SEEDS = {"train": 1, "test": 2}


def canvas(digits: list[tuple[int, np.ndarray]], generator: np.random.Generator) -> Image.Image:
    """White paper with each (slot, 8x8 digit) drawn at a random offset inside its slot."""
    paper = Image.new("L", (CANVAS_WIDTH, CANVAS_HEIGHT), 255)
    for slot, pixels in digits:
        left = slot * CANVAS_HEIGHT + int(generator.integers(0, JITTER + 1))
        top = int(generator.integers(0, JITTER + 1))
        paper.paste(digit_image(pixels, DIGIT_SIDE), (left, top))
    return paper


def write_split(output: Path, split: str, count: int, pools: dict[int, list[int]], images: np.ndarray) -> list[tuple[str, list[str]]]:
    """`count` canvases of the digits in `pools` (digit -> positions in load_digits); returns the manifest rows."""
    generator = np.random.default_rng(SEEDS[split])
    folder = output / split
    folder.mkdir(parents=True, exist_ok=True)
    sizes = list(DIGITS_PER_CANVAS)
    rows = []
    for index in range(count):
        size = int(generator.choice(sizes, p=list(DIGITS_PER_CANVAS.values())))
        chosen = sorted(generator.choice(10, size=size, replace=False).tolist())  # different digits
        slots = generator.permutation(2)[:size].tolist()
        drawn = [(slot, images[int(generator.choice(pools[digit]))]) for slot, digit in zip(slots, chosen)]
        name = f"{split}/{index:05d}.png"
        canvas(drawn, generator).save(output / name)
        rows.append((name, [str(digit) for digit in chosen]))
    return rows


def write_manifests(output: Path, split: str, rows: list[tuple[str, list[str]]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with (output / f"{split}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        writer.writerows((path, "|".join(labels)) for path, labels in rows)
    table = pa.table({"path": [path for path, _ in rows],
                      "labels": pa.array([labels for _, labels in rows], pa.list_(pa.string()))})  # fmt: skip
    pq.write_table(table, output / f"{split}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="examples/data/digits_multilabel", help="Destination folder.")
    parser.add_argument("--train-canvases", type=int, default=6000, help="Training canvases to draw.")
    parser.add_argument("--test-canvases", type=int, default=800, help="Held-out canvases to draw.")
    arguments = parser.parse_args()
    output = Path(arguments.output)
    digits = load_digits()
    split = split_positions(digits.target)
    for name, count, part in (("train", arguments.train_canvases, 0), ("test", arguments.test_canvases, 1)):
        rows = write_split(output, name, count, {digit: positions[part] for digit, positions in split.items()}, digits.images)
        write_manifests(output, name, rows)
        empty = sum(1 for _, labels in rows if not labels)
        print(f"wrote {count} {name} canvases ({empty} empty) and {name}.csv / {name}.parquet to {output}")


if __name__ == "__main__":
    main()
