"""Live TensorBoard: rank 0 writes each finished epoch's scalars to output_dir/tensorboard as the epoch
ends (`train/` and `validation/`, step = epoch), so `tensorboard --logdir` shows a run while it trains."""

from __future__ import annotations

import logging
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from imgcls.platform import storage

logger = logging.getLogger(__name__)

# The folder of each split under tensorboard/, and the prefix of its metrics in an epoch's metrics.
SPLITS = {"train": "", "validation": "val_"}
TRAIN_ONLY_SCALARS = ("learning_rate", "images_per_second")
EVENT_FILE_PREFIX = "events.out.tfevents."  # how TensorFlow's writer names its files


class TensorBoardSink:
    """TensorBoard event files, written with TensorFlow's own writer (`tf.summary.create_file_writer`)
    and flushed after every epoch.

    TensorFlow writes only local files here (s3 would need tensorflow-io): for an s3 output_dir the
    events go to a local temporary folder and are uploaded after each epoch (they are small).

    A resumed run (a restarted worker, or a rerun after the driver died) writes each step at most
    once: `start` reads the steps the destination's event files already hold, and any epoch whose
    step is among them is skipped, whether it is a restored epoch or one redone after the last
    checkpoint. TensorBoard shows the steps of every event file in a folder, and each (re)start gets
    a fresh file, so skipping is all it takes to keep the curves free of duplicates.
    """

    name = "TensorBoard"

    def __init__(self, destination: storage.Location, multilabel: bool) -> None:
        self.destination = destination
        self.scores = ("micro_f1", "exact_match") if multilabel else ("accuracy",)
        self.writers: dict[str, Any] = {}
        self.held_steps: dict[str, set[int]] = {}
        self.local_root: Path | None = None
        self.temporary_root: str | None = None  # s3 only: where the events wait for their upload

    def start(self, history: list[dict[str, Any]]) -> None:
        import tensorflow as tf

        self.held_steps = {split: steps_held(self.destination.join(split)) for split in SPLITS}
        if self.destination.is_local:
            self.local_root = Path(self.destination.path)
        else:
            self.temporary_root = tempfile.mkdtemp(prefix="imgcls-tensorboard-")
            self.local_root = Path(self.temporary_root)
        self.writers = {split: tf.summary.create_file_writer(str(self.local_root / split)) for split in SPLITS}
        logger.info("TensorBoard: events in %s as each epoch ends", self.destination.uri)
        # The restored epochs the events lack: none when they hold them all, every one when this is
        # the first time the run writes events.
        written = [self._write(entry) for entry in history]
        if any(written):
            self._flush()

    def epoch_finished(self, metrics: dict[str, Any]) -> None:
        if self._write(metrics):
            self._flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
        if self.temporary_root is not None:
            shutil.rmtree(self.temporary_root, ignore_errors=True)
            self.temporary_root = None

    def _write(self, metrics: dict[str, Any]) -> bool:
        """One epoch's scalars, in each split whose events lack its step; True when anything was written."""
        import tensorflow as tf

        step, written = int(metrics["epoch"]), False
        for split, prefix in SPLITS.items():
            names = [f"{prefix}{name}" for name in ("loss", *self.scores) if f"{prefix}{name}" in metrics]
            if split == "train":
                names += [name for name in TRAIN_ONLY_SCALARS if name in metrics]
            if not names or step in self.held_steps[split]:
                continue
            with self.writers[split].as_default():
                for name in names:
                    tf.summary.write(
                        name.removeprefix(prefix), tf.constant(float(metrics[name]), tf.float32), step=step,
                        metadata=scalar_metadata(),
                    )  # fmt: skip
            self.held_steps[split].add(step)
            written = True
        return written

    def _flush(self) -> None:
        """Events on disk now; for s3, this run's event files uploaded whole."""
        for writer in self.writers.values():
            writer.flush()
        if self.temporary_root is None:
            return
        for path in sorted(self.local_root.rglob("*")):
            if path.is_file():
                relative = path.relative_to(self.local_root).as_posix()
                storage.write_bytes_atomic(self.destination.join(relative), path.read_bytes())


def scalar_metadata():
    """What marks a summary as a scalar for TensorBoard: the metadata `tf.summary.scalar` writes.
    That function lives in the tensorboard package, which imgcls does not install (TensorBoard is
    for whoever reads the events), so the summaries are written with `tf.summary.write` and this:
    the same bytes as `tf.summary.scalar`'s."""
    import tensorflow as tf

    return tf.compat.v1.SummaryMetadata(plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))


def steps_held(folder: storage.Location) -> set[int]:
    """The steps of the scalars in the event files under `folder` (none when it does not exist: a
    listing of a missing folder or prefix is empty)."""
    steps: set[int] = set()
    for relative in storage.iter_files(folder):
        if relative.rsplit("/", 1)[-1].startswith(EVENT_FILE_PREFIX):
            steps |= event_steps(storage.read_bytes(folder.join(relative)))
    return steps


def event_steps(data: bytes) -> set[int]:
    """The steps of the events with summary values in one event file. Its framing is TFRecord's: per
    record a little-endian uint64 length and its CRC (4 bytes), the record, the record's CRC; a last
    record cut short (a writer killed mid-write) is left out."""
    import tensorflow as tf

    steps, offset = set(), 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        record = data[offset + 12 : offset + 12 + length]
        if len(record) < length:
            break
        event = tf.compat.v1.Event.FromString(record)
        if event.summary.value:
            steps.add(int(event.step))
        offset += 12 + length + 4
    return steps
