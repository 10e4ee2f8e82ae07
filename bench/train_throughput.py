"""Training throughput: imgcls (1 and 2 Ray Train workers) against a plain single-process Keras
`model.fit` on a `tf.data` pipeline over the same image folder, same model and epochs, in one run.

Reports steady-state images/s (epochs after the first, which pays for tracing and warm-up) and the
wall time of each whole job, then the ratios. Results go to bench/results/train_throughput.json.

Usage: python bench/train_throughput.py [--data examples/data/digits/train] [--epochs 15] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imgcls.platform.logs import configure_logging  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plain_keras_baseline(data: Path, image_size: tuple[int, int], channels: int, epochs: int, batch_size: int):
    """What a Keras user writes by hand: tf.data (parallel decode, cache, shuffle, prefetch) + model.fit."""
    import keras
    import tensorflow as tf

    from imgcls.config import ModelConfig
    from imgcls.modeling.models import create_model

    class_names = sorted(path.name for path in data.iterdir() if path.is_dir())
    files = sorted(str(path) for path in data.rglob("*.png"))
    labels = [class_names.index(Path(path).parent.name) for path in files]

    def load(path, label):
        image = tf.io.decode_png(tf.io.read_file(path), channels=channels)
        image = tf.image.resize(image, image_size)
        return image, label

    dataset = (
        tf.data.Dataset.from_tensor_slices((files, labels))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
        .shuffle(2048, seed=0)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    keras.utils.set_random_seed(0)
    model = create_model(ModelConfig(), image_size, channels, len(class_names))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    timer = EpochTimer()
    started = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer])
    wall = time.perf_counter() - started
    rates = [len(files) / seconds for seconds in timer.seconds]
    return {
        "images": len(files),
        "steady_images_per_second": statistics.median(rates[1:]),
        "epoch_images_per_second": rates,
        "wall_seconds": wall,
        "final_accuracy": float(history.history["accuracy"][-1]),
    }


def imgcls_run(data: Path, workers: int, epochs: int, batch_size: int, image_size, channels, output: Path):
    import shutil

    from imgcls import train
    from imgcls.config import load_job_config

    shutil.rmtree(output, ignore_errors=True)  # a fresh run: an existing output_dir would be resumed

    config = load_job_config(
        None,
        [
            f"data.train={data}",
            "data.val_fraction=0",
            f"data.image_size=[{image_size[0]}, {image_size[1]}]",
            f"data.channels={channels}",
            f"train.epochs={epochs}",
            f"train.batch_size={batch_size}",
            f"scaling.num_workers={workers}",
            f"output_dir={output}",
        ],
    )
    started = time.perf_counter()
    result = train.run(config)
    wall = time.perf_counter() - started
    rates = [entry["images_per_second"] for entry in result.history]
    return {
        "workers": workers,
        "images": result.metrics["train_images"],
        "steady_images_per_second": statistics.median(rates[1:]),
        "epoch_images_per_second": rates,
        "wall_seconds": wall,
        "final_accuracy": result.metrics["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="examples/data/digits/train")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    arguments = parser.parse_args()
    configure_logging()
    logging.getLogger("ray").setLevel(logging.WARNING)
    data = Path(arguments.data).resolve()
    size = (arguments.image_size, arguments.image_size)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {"baseline": plain_keras_baseline(data, size, arguments.channels, arguments.epochs, arguments.batch_size)}
    for workers in (1, 2):
        results[f"imgcls_{workers}_worker"] = imgcls_run(
            data, workers, arguments.epochs, arguments.batch_size, size, arguments.channels,
            RESULTS / f"train_run_{workers}",
        )  # fmt: skip
    baseline = results["baseline"]["steady_images_per_second"]
    results["ratios"] = {
        name: round(results[name]["steady_images_per_second"] / baseline, 3)
        for name in ("imgcls_1_worker", "imgcls_2_worker")
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(results, indent=2))
    print(f"{'run':<18}{'steady images/s':>16}{'wall s':>9}{'accuracy':>10}")
    for name in ("baseline", "imgcls_1_worker", "imgcls_2_worker"):
        row = results[name]
        print(f"{name:<18}{row['steady_images_per_second']:>16.0f}{row['wall_seconds']:>9.1f}{row['final_accuracy']:>10.4f}")
    print("ratio to baseline (steady images/s):", results["ratios"])


if __name__ == "__main__":
    main()
