"""Offline transfer learning on the digits, end to end with imgcls' own jobs (no download needed).

1. Pretrain a MobileNetV3Small backbone from scratch on digits 0-4 (all their training images).
2. Save that backbone's weights as a weights file, as one would save ImageNet weights.
3. Fine-tune on digits 5-9 with only 20 images per class: `model.weights` = that file, the backbone
   frozen for `finetune.freeze_epochs` (the new head alone), then unfrozen at a lower learning rate.
4. Train the same network from scratch on the same 100 images, and the tutorial's seed_cnn too.
5. Evaluate all on the held-out test images of digits 5-9 and print the held-out accuracies.

Usage (after `make data`): python examples/transfer_digits.py [--output runs/transfer_digits]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls import evaluate, train  # noqa: E402
from imgcls.config import EvaluateConfig, load_job_config  # noqa: E402
from imgcls.platform.logs import configure_logging  # noqa: E402

PRETRAIN_CLASSES = ["0", "1", "2", "3", "4"]
TARGET_CLASSES = ["5", "6", "7", "8", "9"]
IMAGES_PER_CLASS = 20
IMAGE_SIZE = 32
BACKBONE = "MobileNetV3Small"


def copy_classes(source: Path, destination: Path, classes: list[str], per_class: int | None, seed: int) -> int:
    """Copy a folder-per-class subset; `per_class` images drawn at random (seeded), or all of them."""
    generator = np.random.default_rng(seed)
    total = 0
    for name in classes:
        images = sorted((source / name).glob("*.png"))
        if per_class is not None:
            images = [images[index] for index in sorted(generator.choice(len(images), per_class, replace=False))]
        (destination / name).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, destination / name / image.name)
        total += len(images)
    return total


def train_and_evaluate(name: str, overrides: list[str], test_dir: Path, output: Path) -> float:
    config = load_job_config(None, [*overrides, f"output_dir={output / name}"])
    result = train.run(config)
    summary = evaluate.run(
        EvaluateConfig(model=result.artifact_uri, data=str(test_dir), output=str(output / name / "evaluation"))
    )
    logging.getLogger("transfer_digits").info("%s: held-out accuracy %.4f", name, summary.accuracy)
    return summary.accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default="examples/data/digits", help="Output of make_digits_dataset.py.")
    parser.add_argument("--output", default="runs/transfer_digits")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    configure_logging()
    digits, output = Path(arguments.digits), Path(arguments.output)
    if not (digits / "train" / "0").is_dir():
        raise SystemExit(f"No digits under {digits}: run `make data` first.")
    shutil.rmtree(output, ignore_errors=True)
    data = output / "data"
    pretrain_count = copy_classes(digits / "train", data / "pretrain_0_4", PRETRAIN_CLASSES, None, arguments.seed)
    few_count = copy_classes(digits / "train", data / "few_5_9", TARGET_CLASSES, IMAGES_PER_CLASS, arguments.seed)
    test_count = copy_classes(digits / "test", data / "test_5_9", TARGET_CLASSES, None, arguments.seed)
    logging.info("pretrain %d images (0-4), fine-tune %d images (5-9), test %d images (5-9)",
                 pretrain_count, few_count, test_count)  # fmt: skip

    common = [f"data.image_size=[{IMAGE_SIZE}, {IMAGE_SIZE}]", "data.channels=1", f"seed={arguments.seed}"]
    # 1. Pretrain the backbone from random weights (BatchNorm learns its statistics here).
    pretrain = train.run(load_job_config(None, [
        *common, f"data.train={data / 'pretrain_0_4'}", "data.val_fraction=0.1",
        f"model.name={BACKBONE}", "model.weights=none", "model.dense_units=[]", "model.dense_dropout=0.2",
        "train.epochs=20", "train.batch_size=32", "train.learning_rate=0.002",
        "train.schedule.name=cosine", "augment.rotation_degrees=10", "augment.zoom=0.1",
        f"output_dir={output / 'pretrain_0_4'}",
    ]))  # fmt: skip
    # 2. Its backbone as a weights file: the same kind of file as Keras' ImageNet "no top" weights.
    from imgcls.modeling.artifact import load_artifact
    from imgcls.modeling.backbones import backbone_of

    pretrained_model, _ = load_artifact(pretrain.artifact_uri)
    weights_file = output / "digits_0_4_backbone.weights.h5"
    backbone_of(pretrained_model).save_weights(weights_file)

    few_shot = [*common, f"data.train={data / 'few_5_9'}", "data.val_fraction=0", "train.checkpoint_monitor=loss",
                "train.batch_size=20", "augment.rotation_degrees=10", "augment.zoom=0.1"]  # fmt: skip
    accuracies = {
        # 3. Transfer: the new head alone for 5 epochs at a high rate (its 5 steps an epoch are few),
        #    then the whole backbone (BatchNorm frozen) at 5e-4.
        "transfer (pretrained on 0-4)": train_and_evaluate("transfer", [
            *few_shot, f"model.name={BACKBONE}", f"model.weights={weights_file}", "model.dense_units=[]",
            "finetune.freeze_epochs=5", "finetune.unfreeze_layers=all", "finetune.learning_rate=0.0005",
            "train.epochs=30", "train.learning_rate=0.01",
        ], data / "test_5_9", output),  # fmt: skip
        # 4. The same network and data, from scratch.
        f"{BACKBONE} from scratch": train_and_evaluate("scratch", [
            *few_shot, f"model.name={BACKBONE}", "model.weights=none", "model.dense_units=[]",
            "train.epochs=30", "train.learning_rate=0.002",
        ], data / "test_5_9", output),  # fmt: skip
        "seed_cnn from scratch": train_and_evaluate("seed_cnn", [
            *few_shot, "model.name=seed_cnn", "train.epochs=30", "train.learning_rate=0.001",
        ], data / "test_5_9", output),  # fmt: skip
    }
    (output / "results.json").write_text(json.dumps(accuracies, indent=2))
    print(f"\nHeld-out accuracy on digits 5-9 ({test_count} images), trained on {IMAGES_PER_CLASS} images per class:")
    for name, accuracy in accuracies.items():
        print(f"  {name:32s} {accuracy:.4f}")


if __name__ == "__main__":
    main()
