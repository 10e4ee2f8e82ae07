"""Accuracy of a predictions Parquet dataset against a labelled folder (`root/<class>/<image>`).

Usage: python examples/score_predictions.py --predictions runs/digits/predictions --labelled examples/data/digits/test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.dataset as pads


def score(predictions: str, labelled: str) -> dict[str, float]:
    root = Path(labelled).resolve()
    table = pads.dataset(predictions, format="parquet").to_table(columns=["path", "label", "error"])
    correct = total = errored = 0
    for row in table.to_pylist():
        path = Path(row["path"])
        if root not in path.parents:
            continue
        total += 1
        if row["error"] is not None:
            errored += 1
        elif row["label"] == path.relative_to(root).parts[0]:
            correct += 1
    if total == 0:
        raise SystemExit(f"no predictions for images under {root}")
    return {"images": total, "correct": correct, "errored": errored, "accuracy": correct / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--labelled", required=True)
    arguments = parser.parse_args()
    result = score(arguments.predictions, arguments.labelled)
    print(
        f"held-out accuracy {result['accuracy']:.4f} "
        f"({result['correct']}/{result['images']} correct, {result['errored']} unreadable)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
