"""The one place that knows a training checkpoint's layout: model weights, optimizer state, the
best epoch's weights and the JSON state. Saved by rank 0 each epoch, restored by every worker after
a restart or a resume, and read by the driver for the final model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgcls.config import JobConfig
from imgcls.training.state import TrainState

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer_state.npz"
BEST_WEIGHTS_FILE = "best_weights.npz"


def save_checkpoint(directory: Path, model, optimizer, state: TrainState) -> None:
    """Write everything a worker needs to continue after `state.epoch` into `directory`."""
    directory = Path(directory)
    model.save(directory / MODEL_FILE, include_optimizer=False)
    np.savez(directory / OPTIMIZER_FILE, **{f"variable_{index}": variable.numpy() for index, variable in enumerate(optimizer.variables)})
    if state.best_weights is not None:
        np.savez(directory / BEST_WEIGHTS_FILE, **{f"weight_{index}": weight for index, weight in enumerate(state.best_weights)})
    (directory / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2))


def restore_checkpoint(directory: Path, model, optimizer, config: JobConfig) -> TrainState:
    """Load weights and optimizer state into the built `model` and `optimizer` (same layout as when
    saved), and return the training state."""
    directory = Path(directory)
    values = json.loads((directory / STATE_FILE).read_text())
    model.load_weights(directory / MODEL_FILE)
    with np.load(directory / OPTIMIZER_FILE) as saved:
        for index, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"variable_{index}"])
    best_weights = None
    if (directory / BEST_WEIGHTS_FILE).exists():
        with np.load(directory / BEST_WEIGHTS_FILE) as saved:
            best_weights = [saved[f"weight_{index}"] for index in range(len(saved.files))]
    return TrainState.from_dict(config, values, best_weights)


def read_final_state(directory: Path) -> dict:
    """The JSON state of a checkpoint (history, epochs done), without TensorFlow."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_final_model(directory: Path):
    """The driver's view of the last checkpoint: the trained model (safe mode) and the JSON state."""
    import keras

    import imgcls.modeling.backbones  # noqa: F401  (registers the custom preprocessing layer for loading)

    directory = Path(directory)
    model = keras.saving.load_model(directory / MODEL_FILE, compile=False, safe_mode=True)
    return model, json.loads((directory / STATE_FILE).read_text())
