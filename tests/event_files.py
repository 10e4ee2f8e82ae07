"""TensorBoard event files read back with TensorFlow's own reader, for the tests of the live events."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def scalar_steps(folder: Path) -> dict[str, list[int]]:
    """Every scalar's steps in the event files under `folder`, repeats kept, with TensorFlow's reader
    (a summary counts when it is marked for TensorBoard's scalars plugin, as `tf.summary.scalar` marks it)."""
    import tensorflow as tf

    steps = defaultdict(list)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    steps[value.tag].append(event.step)
    return {tag: sorted(found) for tag, found in steps.items()}


def scalar_values(folder: Path, tag: str) -> dict[int, float]:
    """One scalar's value at each step in the event files under `folder`."""
    import tensorflow as tf

    values = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values
