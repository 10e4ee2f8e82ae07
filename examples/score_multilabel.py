"""Held-out scores of a multi-label artifact on a labelled manifest (`path,labels`), with the
artifact's own per-class thresholds: micro-F1, exact-set accuracy and per-class F1 (scikit-learn),
also at a flat 0.5 for comparison. Runs in this process (no Ray).

Usage: python examples/score_multilabel.py --model runs/digits_multilabel/model \
           --labelled examples/data/digits_multilabel/test.csv
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def score(model_uri: str, labelled: str, batch_size: int = 256) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    from imgcls.data.images import decode_image
    from imgcls.data.listing import list_labelled
    from imgcls.modeling.artifact import load_artifact
    from imgcls.platform import storage

    model, metadata = load_artifact(model_uri)
    if metadata.task != "multilabel":
        raise SystemExit(f"{model_uri} is a {metadata.task} model, not a multi-label one")
    images = list_labelled(labelled)
    unknown = sorted(set(images.class_names) - set(metadata.class_names))
    if unknown:
        raise SystemExit(f"{labelled} has classes {unknown} the model does not know")
    images.class_names = list(metadata.class_names)
    targets = images.label_matrix().astype(int)
    pixels = np.stack([
        decode_image(storage.read_local_file(path, 1 << 24), tuple(metadata.image_size), metadata.channels, 10**8)
        for path in images.paths
    ])  # fmt: skip
    probabilities = np.concatenate([
        model.predict_on_batch(pixels[start : start + batch_size].astype(np.float32))
        for start in range(0, len(pixels), batch_size)
    ])  # fmt: skip
    thresholds = np.array(metadata.decision_thresholds())
    result = {"images": len(targets), "empty_images": int((targets.sum(axis=1) == 0).sum()), "thresholds": thresholds.tolist()}
    for name, cut in (("at_thresholds", thresholds), ("at_0.5", 0.5)):
        predicted = (probabilities >= cut).astype(int)
        result[name] = {
            "micro_f1": float(f1_score(targets, predicted, average="micro")),
            "macro_f1": float(f1_score(targets, predicted, average="macro", zero_division=0)),
            "exact_set_accuracy": float(accuracy_score(targets, predicted)),
            "per_class_f1": dict(zip(metadata.class_names, map(float, f1_score(targets, predicted, average=None, zero_division=0)))),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The artifact folder (output_dir/model).")
    parser.add_argument("--labelled", required=True, help="A CSV or Parquet manifest with path,labels.")
    parser.add_argument("--json", help="Also write the scores to this file.")
    arguments = parser.parse_args()
    result = score(arguments.model, arguments.labelled)
    tuned, flat = result["at_thresholds"], result["at_0.5"]
    print(
        f"held-out micro-F1 {tuned['micro_f1']:.4f}, exact-set accuracy {tuned['exact_set_accuracy']:.4f} on "
        f"{result['images']} images ({result['empty_images']} empty) at the artifact's thresholds; "
        f"at 0.5: micro-F1 {flat['micro_f1']:.4f}, exact-set accuracy {flat['exact_set_accuracy']:.4f}"
    )
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
