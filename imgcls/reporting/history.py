"""A training run's per-epoch history as files a person opens: history.csv, training_curves.png and,
when asked, TensorBoard event files."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from imgcls.platform import storage


def write_history(output_dir: storage.Location, history: list[dict[str, Any]], tensorboard: bool) -> None:
    """history.csv, training_curves.png and (optionally) TensorBoard events, from the per-epoch metrics."""
    import csv
    import io

    from imgcls.reporting.plots import training_curves

    scores = score_names(history)
    columns = ["epoch", "loss", *scores, "val_loss", *[f"val_{name}" for name in scores], "learning_rate",
               "images_per_second", "epoch_seconds", "workers"]  # fmt: skip
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    storage.write_text_atomic(output_dir.join("history.csv"), text.getvalue())
    storage.write_bytes_atomic(output_dir.join("training_curves.png"), training_curves(history))
    if tensorboard:
        _write_tensorboard(output_dir.join("tensorboard"), history)


def score_names(history: list[dict[str, Any]]) -> list[str]:
    """The per-epoch scores besides the loss: accuracy, or micro_f1 and exact_match for multi-label runs."""
    return ["micro_f1", "exact_match"] if history and "micro_f1" in history[0] else ["accuracy"]


def _write_tensorboard(destination: storage.Location, history: list[dict[str, Any]]) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="imgcls-tensorboard-") as local:
        for split, prefix in (("train", ""), ("validation", "val_")):
            writer = tf.summary.create_file_writer(str(Path(local) / split))
            with writer.as_default():
                for entry in history:
                    for name in ("loss", *score_names(history)):
                        if f"{prefix}{name}" in entry:
                            tf.summary.scalar(name, entry[f"{prefix}{name}"], step=entry["epoch"])
                    if split == "train":
                        tf.summary.scalar("learning_rate", entry["learning_rate"], step=entry["epoch"])
                        tf.summary.scalar("images_per_second", entry["images_per_second"], step=entry["epoch"])
            writer.close()
        for path in Path(local).rglob("*"):
            if path.is_file():
                storage.write_bytes_atomic(destination.join(path.relative_to(local).as_posix()), path.read_bytes())
