"""A hand-made multi-label artifact and images it can be scored on, without training.

The model's class k answers "is colour channel k bright?": pixels scaled to [0, 1], averaged per
channel, and one sigmoid per class of 12 x (mean - 0.5). Each image is one colour with some noise,
and its true label set is the channels above half brightness, with a few labels flipped so that the
evaluation has false positives and negatives to find."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["blue", "green", "red"]  # sorted, as training orders them
CHANNEL_OF_CLASS = {"red": 0, "green": 1, "blue": 2}
THRESHOLDS = [0.4, 0.5, 0.6]
SIZE = 16


def colour_model():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    scaled = keras.layers.Rescaling(1.0 / 255)(inputs)
    means = keras.layers.GlobalAveragePooling2D()(scaled)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="sigmoid", name="predictions")(means)
    model = keras.Model(inputs, outputs)
    weights = np.zeros((3, len(CLASS_NAMES)), np.float32)
    for column, name in enumerate(CLASS_NAMES):
        weights[CHANNEL_OF_CLASS[name], column] = 12.0
    model.get_layer("predictions").set_weights([weights, np.full(len(CLASS_NAMES), -6.0, np.float32)])
    return model


def save_colour_artifact(uri: str, thresholds: list[float] | None = THRESHOLDS) -> None:
    from imgcls.modeling.artifact import save_artifact

    fields = {"class_names": CLASS_NAMES, "image_size": (SIZE, SIZE), "channels": 3, "task": "multilabel",
              "thresholds": thresholds, "model_name": "seed_cnn"}  # fmt: skip
    save_artifact(colour_model(), fields, uri)


def write_colour_images(root: Path, count: int, seed: int, flip_rate: float = 0.15) -> dict[str, tuple[str, ...]]:
    """`count` PNGs under `root`; returns each image's path and its true label set."""
    generator = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, tuple[str, ...]] = {}
    for index in range(count):
        levels = generator.uniform(0.1, 0.9, 3)
        pixels = levels[None, None, :] * 255 + generator.normal(0, 12, (SIZE, SIZE, 3))
        path = root / f"image_{index:03d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        carried = {name for name in CLASS_NAMES if levels[CHANNEL_OF_CLASS[name]] > 0.5}
        flipped = {name for name in CLASS_NAMES if generator.random() < flip_rate}
        truth[str(path)] = tuple(sorted(carried ^ flipped))
    return truth


def probabilities_from_keras(model_uri: str, paths: list[str]) -> np.ndarray:
    """Each image's probability per class straight from the saved Keras model, on pixels Pillow decoded
    (none of imgcls's decoding or prediction code)."""
    import keras

    model = keras.saving.load_model(Path(model_uri) / "model.keras", compile=False, safe_mode=True)
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB"), np.float32) for path in paths])
    return np.asarray(model.predict(pixels, verbose=0), np.float32)


def write_labels_csv(path: Path, truth: dict[str, tuple[str, ...]]) -> str:
    path.write_text("path,labels\n" + "".join(f"{image},{'|'.join(names)}\n" for image, names in truth.items()))
    return str(path)
