"""The plain alternative a Keras user writes by hand, run as its own process by bench/train_job.py:
`image_dataset_from_directory` + `cache()` + `fit` + `evaluate` + `save`, the tutorial CNN, no Ray.

Usage: python bench/plain_keras_train.py DATA OUTPUT --image-size 64 --channels 3 --epochs 10 --batch-size 32
Prints one JSON line: per-epoch seconds and images/s, and the seconds since the process started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    arguments = parser.parse_args()
    import keras

    from imgcls.config import ModelConfig
    from imgcls.modeling.models import create_model

    size = (arguments.image_size, arguments.image_size)
    dataset = keras.utils.image_dataset_from_directory(
        arguments.data, image_size=size, color_mode="rgb" if arguments.channels == 3 else "grayscale",
        batch_size=arguments.batch_size, seed=0, verbose=False,
    ).cache()  # fmt: skip
    images = sum(int(batch[1].shape[0]) for batch in dataset)
    keras.utils.set_random_seed(0)
    model = create_model(ModelConfig(), size, arguments.channels, 10)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochTimer(keras.callbacks.Callback):
        seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    timer = EpochTimer()
    first_epoch_at = time.time()
    history = model.fit(dataset, epochs=arguments.epochs, verbose=0, callbacks=[timer])
    model.evaluate(dataset, verbose=0)
    Path(arguments.output).mkdir(parents=True, exist_ok=True)
    model.save(Path(arguments.output) / "model.keras")
    print(json.dumps({
        "images": images, "epoch_seconds": timer.seconds,
        "epoch_images_per_second": [images / seconds for seconds in timer.seconds],
        "until_first_epoch_s": first_epoch_at - STARTED, "done_s": time.time() - STARTED,
        "accuracy": float(history.history["accuracy"][-1]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
