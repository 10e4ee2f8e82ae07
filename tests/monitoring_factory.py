"""A small real model for the monitoring tests, trained here with plain Keras (no Ray): the tutorial
CNN on three pattern classes, saved as an imgcls artifact with a reference profile made by the same
code training uses (`imgcls.monitoring.reference`) on its validation folder; and the shifted inputs
drift must be found in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from image_factory import write_pattern_dataset
from PIL import Image, ImageOps

SIZE = 16
CLASS_NAMES = ["horizontal", "square", "vertical"]  # sorted, as training orders them


def _decoded(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def labelled_paths(root: Path) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for index, name in enumerate(CLASS_NAMES):
        found = sorted(str(path) for path in (root / name).glob("*.png"))
        paths += found
        labels += [index] * len(found)
    return paths, np.array(labels)


def train_monitored_artifact(root: Path, with_profile: bool = True) -> dict[str, Path]:
    """Write train/val/holdout pattern folders under `root` and a trained artifact with its profile."""
    import keras

    from imgcls.config import DEFAULT_MAX_IMAGE_PIXELS
    from imgcls.modeling.artifact import save_artifact
    from imgcls.modeling.models import create_seed_cnn
    from imgcls.monitoring.profile import profile_files
    from imgcls.monitoring.reference import reference_profile

    folders = {name: root / name for name in ("train", "val", "holdout")}
    for (name, folder), (per_class, seed) in zip(folders.items(), ((60, 11), (50, 12), (80, 13))):
        write_pattern_dataset(folder, per_class=per_class, num_classes=3, size=SIZE, seed=seed)
    keras.utils.set_random_seed(3)
    paths, labels = labelled_paths(folders["train"])
    model = create_seed_cnn((SIZE, SIZE), 3, len(CLASS_NAMES))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(_decoded(paths).astype(np.float32), labels, epochs=4, batch_size=16, verbose=0)
    extra = {}
    if with_profile:
        val_paths, _ = labelled_paths(folders["val"])
        decode = {"image_size": (SIZE, SIZE), "channels": 3, "max_pixels": DEFAULT_MAX_IMAGE_PIXELS}
        extra = profile_files(*reference_profile(model, CLASS_NAMES, "multiclass", val_paths, decode, "validation"))
    fields = {"class_names": CLASS_NAMES, "image_size": (SIZE, SIZE), "channels": 3, "task": "multiclass",
              "model_name": "seed_cnn"}  # fmt: skip
    folders["model"] = root / "model"
    save_artifact(model, fields, str(folders["model"]), extra_files=extra)
    return folders


def write_manifest(path: Path, image_paths: list[str]) -> Path:
    path.write_text("path\n" + "".join(f"{image}\n" for image in image_paths))
    return path


def write_inverted(source_paths: list[str], folder: Path) -> list[str]:
    """Colour-inverted copies (what an upstream bug that flips the pixel values would deliver)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(source_paths):
        target = folder / f"inverted_{index:04d}.png"
        ImageOps.invert(Image.open(path).convert("RGB")).save(target)
        written.append(str(target))
    return written


def write_other_domain(folder: Path, count: int) -> list[str]:
    """Another image domain: scikit-learn's bundled handwritten digits, greyscale strokes rendered as
    RGB at the same 16x16 as the stripe and square patterns the model knows."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits().images[:count]
    written = []
    for index, digit in enumerate(digits):
        pixels = (digit / 16.0 * 255).astype(np.uint8)
        target = folder / f"digit_{index:04d}.png"
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB").save(target)
        written.append(str(target))
    return written
