"""A training run's per-epoch history as files a person opens: history.csv and training_curves.png
(TensorBoard's events are written live by rank 0: imgcls.training.tensorboard_sink)."""

from __future__ import annotations

from typing import Any

from imgcls.platform import storage


def write_history(output_dir: storage.Location, history: list[dict[str, Any]]) -> None:
    """history.csv and training_curves.png, from the per-epoch metrics."""
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


def score_names(history: list[dict[str, Any]]) -> list[str]:
    """The per-epoch scores besides the loss: accuracy, or micro_f1 and exact_match for multi-label runs."""
    return ["micro_f1", "exact_match"] if history and "micro_f1" in history[0] else ["accuracy"]
