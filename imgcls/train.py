"""Training: the Ray Train driver (`run`) and the per-worker loop (`train_loop_per_worker`).

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy, so each worker runs an explicit
distributed step: model and optimizer live in `strategy.scope()`, gradients are all-reduced by
the optimizer, and the loss is averaged over the global batch.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from imgcls import storage
from imgcls.config import JobConfig, config_to_yaml
from imgcls.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CHECKPOINT_MODEL_FILE = "model.keras"
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_OPTIMIZER_FILE = "optimizer_state.npz"
CHECKPOINT_BEST_FILE = "best_weights.npz"


class TrainResult(BaseModel):
    """What a training run produced."""

    model_config = {"protected_namespaces": ()}

    artifact_uri: str
    model_version: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------- worker side


def _configure_worker_logging() -> None:
    """Ray Train already forwards worker log records to the driver; only add our handler when it does not."""
    from imgcls.logging_setup import configure_logging

    if logging.getLogger().handlers:
        logging.getLogger("imgcls").setLevel(logging.INFO)
    else:
        configure_logging()


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def data_task_cpus(config: JobConfig) -> float:
    """CPUs per Ray Data task: a whole one, unless the plan keeps less than that for data (Tune
    trials sharing a small cluster), where a 1-CPU task would wait forever."""
    return min(1.0, config.scaling.data_cpus)


def epoch_pipeline(shard, config: JobConfig, epoch: int, rank: int, randomize_blocks: bool = True):
    """This worker's shard for one epoch: blocks in a new order, then augmented as Ray Data tasks
    (on the CPUs the resource plan keeps for data), so the training process only trains.

    A shard that fits in the local shuffle buffer is reshuffled whole by the iterator, so it skips
    the block shuffle and, without augmentation, runs no Ray Data job per epoch at all."""
    from imgcls.augment import augment_rows

    pipeline = shard
    if randomize_blocks:
        pipeline = pipeline.randomize_block_order(seed=config.seed * 1000 + epoch * 10 + rank)
    if config.augment.is_active:
        pipeline = pipeline.map_batches(
            augment_rows,
            batch_size=config.train.batch_size,
            batch_format="numpy",
            fn_kwargs={"config": config.augment, "seed": config.seed, "epoch": epoch},
            num_cpus=data_task_cpus(config),
        )
    return pipeline


# A worker keeps its decoded shard in memory when it is at most this big and unaugmented (what
# `tf.data.Dataset.cache()` does for a plain Keras loop): later epochs then reshuffle in numpy
# instead of streaming the same pixels from the object store again.
SHARD_CACHE_MAX_BYTES = 512 * 1024 * 1024


class ShardCache:
    """The decoded images and labels of one worker's shard, filled during the first epoch."""

    def __init__(self) -> None:
        self.images: list = []
        self.labels: list = []
        self.ready = False

    def add(self, batch: dict) -> None:
        self.images.append(batch["image"])
        self.labels.append(batch["label"])

    def finish(self) -> None:
        import numpy as np

        self.images = np.concatenate(self.images)
        self.labels = np.concatenate(self.labels)
        self.ready = True

    def batches(self, batch_size: int, seed: int):
        """A fresh seeded permutation every epoch, cut into batches like Ray Data's iterator."""
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(self.labels))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield {"image": self.images[chosen], "label": self.labels[chosen]}


def evaluation_batches(shard, batch_size: int):
    """Validation batches: the decoded pixels exactly as stored, never augmented."""
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def _monitor_order(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one model replica, one shard of the data.

    Resumes from `ray.train.get_checkpoint()` when Ray Train restarts the workers after a failure,
    or when the same run (same output_dir) is started again after the driver died.
    """
    import numpy as np
    import ray.train
    import tensorflow as tf

    # The strategy must exist before TensorFlow runs any op in this process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras

    from imgcls.backbones import set_finetune_phase
    from imgcls.models import create_loss, create_model, create_optimizer
    from imgcls.schedules import EarlyStopper, PlateauTracker, learning_rate_at

    _configure_worker_logging()
    config = JobConfig.model_validate(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    rows_per_worker: int = loop_config["rows_per_worker"]
    rank = ray.train.get_context().get_world_rank()
    num_classes = len(class_names)
    binary = num_classes == 2
    batch_size = config.train.batch_size
    total_epochs = config.train.epochs
    mixed_precision = config.train.mixed_precision and config.scaling.use_gpu
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    keras.utils.set_random_seed(config.seed)
    finetune = config.finetune
    # Pretrained backbones train in phases (head first, then the top of the backbone).
    fine_tuning = config.model.is_pretrained_backbone
    with strategy.scope():
        model = create_model(config.model, tuple(config.data.image_size), config.data.channels, num_classes)
        optimizer = create_optimizer(config.train.optimizer, config.train.learning_rate)
        if mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if fine_tuning and finetune.freeze_epochs is not None:
            # Slots for every variable phase 2 will train, so the optimizer state (and its checkpoint
            # layout) is the same in both phases.
            set_finetune_phase(model, frozen=False, unfreeze_layers=finetune.unfreeze_layers)
        elif fine_tuning:
            set_finetune_phase(model, frozen=True)
        optimizer.build(model.trainable_variables)
    if loop_config.get("initial_weights") is not None:
        model.set_weights(ray.get(loop_config["initial_weights"]))
    loss_function = create_loss(num_classes, config.train.label_smoothing, loop_config["class_weights"])

    def backbone_frozen_at(epoch: int) -> bool:
        return fine_tuning and (finetune.freeze_epochs is None or epoch < finetune.freeze_epochs)

    def base_learning_rate_at(epoch: int) -> float:
        if fine_tuning and not backbone_frozen_at(epoch):
            return finetune.learning_rate or config.train.learning_rate / 10
        return config.train.learning_rate

    # Training state that must survive a restart, restored from the latest checkpoint.
    start_epoch = 0
    history: list[dict[str, Any]] = []
    plateau = PlateauTracker(config.train.schedule)
    stopper = EarlyStopper(config.train.early_stopping)
    best_weights = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            state = json.loads((Path(checkpoint_dir) / CHECKPOINT_STATE_FILE).read_text())
            model.load_weights(Path(checkpoint_dir) / CHECKPOINT_MODEL_FILE)
            saved_optimizer = np.load(Path(checkpoint_dir) / CHECKPOINT_OPTIMIZER_FILE)
            for index, variable in enumerate(optimizer.variables):
                variable.assign(saved_optimizer[f"variable_{index}"])
            if (Path(checkpoint_dir) / CHECKPOINT_BEST_FILE).exists():
                with np.load(Path(checkpoint_dir) / CHECKPOINT_BEST_FILE) as saved_best:
                    best_weights = [saved_best[f"weight_{index}"] for index in range(len(saved_best.files))]
        start_epoch, history = state["epoch"], state["history"]
        plateau = PlateauTracker(config.train.schedule, **state["plateau"])
        stopper = EarlyStopper(config.train.early_stopping, **state["early_stopping"])
        if rank == 0:
            logger.info("resuming from the checkpoint after epoch %d of %d", start_epoch, total_epochs)
        if state.get("stopped_early") or start_epoch >= total_epochs:
            start_epoch = total_epochs  # Nothing left to train; report the restored state once more below.

    def correct_count(labels, probabilities):
        if binary:
            predicted = tf.cast(probabilities[:, 0] > 0.5, tf.int32)
        else:
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))

    def replica_train_step(images, labels):
        images = tf.cast(images, tf.float32)
        labels = tf.cast(labels, tf.int32)
        global_batch_size = tf.shape(labels)[0] * strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example_loss = loss_function(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch_size)
            scaled_loss = optimizer.scale_loss(loss) if mixed_precision else loss
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), correct_count(labels, probabilities), count])

    def replica_eval_step(images, labels):
        labels = tf.cast(labels, tf.int32)
        probabilities = model(tf.cast(images, tf.float32), training=False)
        per_example_loss = loss_function(labels, probabilities)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), correct_count(labels, probabilities), count])

    def local_value(per_replica):
        return strategy.experimental_local_results(per_replica)[0]

    def make_train_step():
        # A new tf.function per fine-tuning phase: the trainable variables are fixed when it is traced.
        @tf.function(reduce_retracing=True)
        def train_step(images, labels):
            return local_value(strategy.run(replica_train_step, args=(images, labels)))

        return train_step

    train_step = make_train_step()
    current_phase_frozen: bool | None = None

    def enter_phase(epoch: int) -> None:
        nonlocal train_step, current_phase_frozen
        frozen = backbone_frozen_at(epoch)
        if not fine_tuning or frozen == current_phase_frozen:
            return
        trainable_layers = set_finetune_phase(model, frozen, finetune.unfreeze_layers)
        train_step = make_train_step()
        if rank == 0:
            if frozen:
                logger.info("fine-tuning phase 1: backbone frozen, training the head only")
            else:
                logger.info(
                    "fine-tuning phase 2 from epoch %d: %d backbone layers trainable (BatchNorm stays frozen), "
                    "base learning rate %.3g",
                    epoch + 1,
                    len(trainable_layers),
                    base_learning_rate_at(epoch),
                )
        current_phase_frozen = frozen

    @tf.function(reduce_retracing=True)
    def eval_step(images, labels):
        return local_value(strategy.run(replica_eval_step, args=(images, labels)))

    @tf.function
    def sum_across_workers(values):
        per_replica = strategy.run(tf.identity, args=(values,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def gather_across_workers(values):
        per_replica = strategy.run(tf.identity, args=(values,))
        return strategy.gather(per_replica, axis=0)

    def weights_checksum() -> float:
        return float(sum(np.asarray(variable.numpy(), dtype=np.float64).sum() for variable in model.weights))

    learning_rate_target = optimizer.inner_optimizer if mixed_precision else optimizer
    current_learning_rate = None

    def set_learning_rate(value: float) -> None:
        nonlocal current_learning_rate
        if value != current_learning_rate:
            learning_rate_target.learning_rate.assign(value)
            current_learning_rate = value

    def save_and_report(metrics: dict[str, Any], epoch_done: int, stopped_early: bool) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        state = {
            "epoch": epoch_done,
            "history": history,
            "plateau": plateau.state(),
            "early_stopping": stopper.state(),
            "stopped_early": stopped_early,
        }
        with tempfile.TemporaryDirectory(prefix="imgcls-checkpoint-") as checkpoint_dir:
            directory = Path(checkpoint_dir)
            model.save(directory / CHECKPOINT_MODEL_FILE, include_optimizer=False)
            np.savez(
                directory / CHECKPOINT_OPTIMIZER_FILE,
                **{f"variable_{index}": variable.numpy() for index, variable in enumerate(optimizer.variables)},
            )
            if best_weights is not None:
                np.savez(directory / CHECKPOINT_BEST_FILE, **{f"weight_{i}": w for i, w in enumerate(best_weights)})
            (directory / CHECKPOINT_STATE_FILE).write_text(json.dumps(state, indent=2))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))

    train_shard = loop_config["train_shards"][rank]
    val_shards = loop_config["val_shards"]
    val_shard = val_shards[rank] if val_shards else None
    shuffle_buffer = max(batch_size, min(2048, rows_per_worker))
    shard_bytes = rows_per_worker * int(np.prod(config.data.image_size)) * config.data.channels
    cache = ShardCache() if not config.augment.is_active and shard_bytes <= SHARD_CACHE_MAX_BYTES else None
    training_started = time.perf_counter()
    early = config.train.early_stopping
    stopped_early = False

    for epoch in range(start_epoch, total_epochs):
        enter_phase(epoch)
        epoch_started = time.perf_counter()
        local_sums = np.zeros(3, dtype=np.float64)
        steps = 0
        epoch_seed = config.seed * 1000 + epoch * 10 + rank
        if cache is not None and cache.ready:
            batches = cache.batches(batch_size, epoch_seed)
        else:
            batches = epoch_pipeline(train_shard, config, epoch, rank, rows_per_worker > shuffle_buffer).iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=shuffle_buffer,
                local_shuffle_seed=epoch_seed,
            )
        for batch in batches:
            if cache is not None and not cache.ready:
                cache.add(batch)
            if steps == steps_per_epoch:
                raise RuntimeError(f"worker {rank} received more than the planned {steps_per_epoch} batches")
            set_learning_rate(
                learning_rate_at(
                    config.train.schedule,
                    base_learning_rate_at(epoch),
                    epoch * steps_per_epoch + steps,
                    steps_per_epoch,
                    total_epochs,
                    plateau.scale,
                )
            )
            local_sums += train_step(batch["image"], batch["label"]).numpy()
            steps += 1
        if steps != steps_per_epoch:
            # Stopping here (rather than waiting in a collective the others never join) lets Ray
            # Train tear the group down instead of hanging.
            raise RuntimeError(f"worker {rank} received {steps} batches, planned {steps_per_epoch}")
        if cache is not None and not cache.ready:
            cache.finish()
        train_loss, train_correct, train_count = sum_across_workers(tf.constant(local_sums, dtype=tf.float32)).numpy()
        train_seconds = time.perf_counter() - epoch_started
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(train_loss / train_count),
            "accuracy": float(train_correct / train_count),
            "learning_rate": float(current_learning_rate),
            "images_per_second": float(train_count / train_seconds),
            "train_images": int(train_count),
        }
        if val_shard is not None:
            val_sums = np.zeros(3, dtype=np.float64)
            for batch in evaluation_batches(val_shard, batch_size):
                val_sums += eval_step(batch["image"], batch["label"]).numpy()
            val_loss, val_correct, val_count = sum_across_workers(tf.constant(val_sums, dtype=tf.float32)).numpy()
            metrics["val_loss"] = float(val_loss / max(val_count, 1.0))
            metrics["val_accuracy"] = float(val_correct / max(val_count, 1.0))
        metrics["epoch_seconds"] = time.perf_counter() - epoch_started
        history.append(dict(metrics))
        if config.train.schedule.name == "reduce_on_plateau":
            plateau.update(metrics)
        if early.enabled:
            stopped_early = stopper.update(epoch + 1, metrics)
            if early.restore_best_weights and stopper.best_epoch == epoch + 1:
                best_weights = [np.array(weight) for weight in model.get_weights()]
        last_epoch = stopped_early or epoch + 1 == total_epochs
        if stopped_early and early.restore_best_weights and best_weights is not None:
            model.set_weights(best_weights)
            metrics["restored_epoch"] = stopper.best_epoch
        if last_epoch:
            checksums = gather_across_workers(tf.constant([weights_checksum()], dtype=tf.float64)).numpy()
            metrics["weights_checksums"] = [float(value) for value in checksums]
            metrics["stopped_early"] = stopped_early
        if rank == 0:
            done = epoch + 1 - start_epoch
            remaining = (time.perf_counter() - training_started) / done * (total_epochs - epoch - 1)
            validation = (
                f" val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f}"
                if "val_loss" in metrics
                else ""
            )
            logger.info(
                "epoch %d/%d loss %.4f accuracy %.4f%s lr %.3g images/s %.0f eta %s",
                epoch + 1,
                total_epochs,
                metrics["loss"],
                metrics["accuracy"],
                validation,
                metrics["learning_rate"],
                metrics["images_per_second"],
                _format_seconds(remaining),
            )
            if stopped_early:
                logger.info(
                    "early stopping: %s did not improve for %d epochs; %s",
                    early.monitor,
                    early.patience,
                    f"restored the weights of epoch {stopper.best_epoch}"
                    if "restored_epoch" in metrics
                    else "keeping the last weights",
                )
        save_and_report(metrics, epoch + 1, stopped_early)
        if stopped_early:
            break
    else:
        if start_epoch >= total_epochs and rank == 0:
            logger.info("training had already finished; nothing left to do")


# --------------------------------------------------------------------------- driver side


def _write_augmentation_samples(output_dir: storage.Location, dataset, config: JobConfig) -> None:
    """A grid of training images as the model sees them: each original, then one augmentation per epoch."""
    import io

    from imgcls.augment import describe, sample_grid

    batch = dataset.take_batch(8, batch_format="numpy")
    variants = 6 if config.augment.is_active else 0
    grid = sample_grid(batch["image"], batch["row"], config.augment, config.seed, variants=variants)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    storage.write_bytes_atomic(output_dir.join("augmentation_samples.png"), buffer.getvalue())
    logger.info("augmentation: %s; samples in %s", describe(config.augment), output_dir.join("augmentation_samples.png").uri)


def _check_resumable(output_dir: storage.Location, config: JobConfig) -> None:
    """Rerunning into the same output_dir resumes; refuse when the earlier run's model cannot be resumed."""
    import yaml

    saved_config = output_dir.join("config.yaml")
    checkpoints = output_dir.join("checkpoints", "train")
    if not storage.exists(checkpoints) or not storage.exists(saved_config):
        return
    earlier = yaml.safe_load(storage.read_bytes(saved_config))
    current = config.model_dump(mode="json")
    changed = [
        key
        for section, key in (("model", None), ("data", "image_size"), ("data", "channels"), ("data", "train"))
        if (earlier.get(section) if key is None else earlier.get(section, {}).get(key))
        != (current.get(section) if key is None else current.get(section, {}).get(key))
    ]
    if changed:
        names = ["model" if key is None else f"data.{key}" for key in changed]
        raise ConfigError(
            f"{output_dir.uri} holds checkpoints of an earlier run with a different {', '.join(names)}; "
            "rerunning into the same output_dir resumes that run. Use a new output_dir to start afresh."
        )
    logger.info("found checkpoints of an earlier run in %s: resuming from the latest", checkpoints.uri)


def write_history(output_dir: storage.Location, history: list[dict[str, Any]], tensorboard: bool) -> None:
    """history.csv, training_curves.png and (optionally) TensorBoard events, from the per-epoch metrics."""
    import csv
    import io

    from imgcls.plots import training_curves

    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second",
               "epoch_seconds"]  # fmt: skip
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    storage.write_text_atomic(output_dir.join("history.csv"), text.getvalue())
    storage.write_bytes_atomic(output_dir.join("training_curves.png"), training_curves(history))
    if tensorboard:
        _write_tensorboard(output_dir.join("tensorboard"), history)


def _write_tensorboard(destination: storage.Location, history: list[dict[str, Any]]) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="imgcls-tensorboard-") as local:
        for split, prefix in (("train", ""), ("validation", "val_")):
            writer = tf.summary.create_file_writer(str(Path(local) / split))
            with writer.as_default():
                for entry in history:
                    for name in ("loss", "accuracy"):
                        if f"{prefix}{name}" in entry:
                            tf.summary.scalar(name, entry[f"{prefix}{name}"], step=entry["epoch"])
                    if split == "train":
                        tf.summary.scalar("learning_rate", entry["learning_rate"], step=entry["epoch"])
                        tf.summary.scalar("images_per_second", entry["images_per_second"], step=entry["epoch"])
            writer.close()
        for path in Path(local).rglob("*"):
            if path.is_file():
                storage.write_bytes_atomic(destination.join(path.relative_to(local).as_posix()), path.read_bytes())


def _write_skipped(output_dir: storage.Location, skipped: list[dict[str, str]]) -> None:
    import pyarrow as pa

    table = pa.table(
        {"path": pa.array([row["path"] for row in skipped], pa.string()),
         "error": pa.array([row["error"] for row in skipped], pa.string())}
    )  # fmt: skip
    storage.write_parquet_atomic(output_dir.join("skipped_images.parquet"), table)


def _list_data(config: JobConfig):
    """List and split the labelled images (cheap): returns class names, train and val listings."""
    from imgcls import data

    endpoint_url = config.storage.endpoint_url
    images = data.list_labelled(config.data.train, endpoint_url)
    if config.data.val:
        train_images = images
        val_images = data.list_labelled(config.data.val, endpoint_url)
        unknown = sorted(set(val_images.class_names) - set(images.class_names))
        if unknown:
            raise DataError(
                f"data.val has class folder(s) {unknown} that data.train lacks; both must use the same classes."
            )
        val_images.class_names = images.class_names
    else:
        train_images, val_images = data.stratified_split(images, config.data.val_fraction, config.seed)
    logger.info(
        "found %d labelled images in %d classes under %s (%d other files ignored)",
        len(images.paths),
        len(images.class_names),
        config.data.train,
        images.ignored,
    )
    return images.class_names, train_images, val_images


def _decode_data(config: JobConfig, train_images, val_images):
    """Decode both splits into the object store; fail when a class has nothing readable."""
    from imgcls import data

    settings = dict(
        image_size=tuple(config.data.image_size),
        channels=config.data.channels,
        max_pixels=config.data.max_image_pixels,
        max_bytes=config.data.max_image_bytes,
        decode_batch_size=config.data.decode_batch_size,
        seed=config.seed,
        endpoint_url=config.storage.endpoint_url,
        num_cpus=data_task_cpus(config),
    )
    train_split = data.prepare_split(train_images, split_name="train", **settings)
    empty = [name for name, count in train_split.class_counts.items() if count == 0]
    if train_split.num_rows == 0:
        raise DataError(f"None of the {len(train_images.paths)} training images under {config.data.train} is readable.")
    if empty:
        raise DataError(
            f"Class(es) {empty} have no readable training images after skipping unreadable files; "
            "add images or remove those class folders."
        )
    val_split = data.prepare_split(val_images, split_name="val", **settings) if val_images else None
    return train_split, val_split


def run(config: JobConfig, callbacks: list | None = None, plan_with_free_cpus: bool = True) -> TrainResult:
    """Train `config` on the current Ray cluster and write the model artifact to `output_dir/model`.

    `callbacks` are Ray Train callbacks (Ray Tune passes its report callback here). A Tune trial
    plans with the cluster's total CPUs (`plan_with_free_cpus=False`): the search already gave it
    its share, and CPUs a stopped trial is still releasing are worth waiting for."""
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from imgcls.artifact import save_artifact
    from imgcls.initial_weights import prepare_initial_weights
    from imgcls.models import class_weight_vector, task_for
    from imgcls.ray_runtime import cluster_totals, ensure_ray, free_resources
    from imgcls.resources import plan_training

    ensure_ray()
    totals = free_resources() if plan_with_free_cpus else cluster_totals()
    plan = plan_training(config.scaling, totals["CPU"], totals["GPU"])
    logger.info("resource plan: %s", plan.describe())

    output_dir = storage.resolve(config.output_dir, config.storage.endpoint_url)
    _check_resumable(output_dir, config)
    storage.write_text_atomic(output_dir.join("config.yaml"), config_to_yaml(config))
    class_names, train_images, val_images = _list_data(config)
    # Before decoding: a missing weights file or an offline ImageNet download fails in seconds.
    initial_weights = prepare_initial_weights(config, class_names)
    train_split, val_split = _decode_data(config, train_images, val_images)
    skipped = train_split.skipped + (val_split.skipped if val_split else [])
    _write_skipped(output_dir, skipped)

    rows_per_worker = train_split.num_rows // plan.num_workers
    if rows_per_worker == 0:
        raise DataError(
            f"Only {train_split.num_rows} training images for scaling.num_workers={plan.num_workers}: "
            "each worker needs at least one image."
        )
    steps_per_epoch = math.ceil(rows_per_worker / config.train.batch_size)
    _write_augmentation_samples(output_dir, train_split.dataset, config)
    # Equal shards, one per worker: every worker runs the same number of steps, as the collective
    # gradient all-reduce requires. At most num_workers - 1 images per epoch are left out.
    train_shards = train_split.dataset.split(plan.num_workers, equal=True)
    val_shards = (
        val_split.dataset.split(plan.num_workers, equal=False) if val_split is not None and val_split.num_rows else None
    )

    monitor = config.train.checkpoint_monitor if val_shards else "loss"
    try:
        class_weights = class_weight_vector(config.train.class_weights, class_names, train_split.class_counts)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.train.early_stopping.enabled and config.train.early_stopping.monitor.startswith("val_") and not val_shards:
        raise ConfigError(
            f"train.early_stopping.monitor is '{config.train.early_stopping.monitor}' but there is no validation "
            "set: set data.val or data.val_fraction > 0, or monitor 'loss'."
        )
    resources_per_worker: dict[str, float] = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources_per_worker["GPU"] = plan.gpus_per_worker
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "class_names": class_names,
            "steps_per_epoch": steps_per_epoch,
            "rows_per_worker": rows_per_worker,
            "train_shards": train_shards,
            "val_shards": val_shards,
            "class_weights": class_weights,
            "initial_weights": ray.put(initial_weights) if initial_weights is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers, use_gpu=config.scaling.use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=output_dir.join("checkpoints").path,
            storage_filesystem=None if output_dir.is_local else output_dir.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep,
                checkpoint_score_attribute=monitor,
                checkpoint_score_order=_monitor_order(monitor),
            ),
        ),
    )
    logger.info(
        "training %s on %d images (%d steps of %d per worker and epoch), %d validation images",
        config.model.name,
        train_split.num_rows,
        steps_per_epoch,
        config.train.batch_size,
        val_split.num_rows if val_split else 0,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the worker logs above")

    import keras

    import imgcls.backbones  # noqa: F401  (registers the custom preprocessing layer for loading)

    with result.checkpoint.as_directory() as checkpoint_dir:
        model = keras.saving.load_model(Path(checkpoint_dir) / CHECKPOINT_MODEL_FILE, compile=False, safe_mode=True)
        state = json.loads((Path(checkpoint_dir) / CHECKPOINT_STATE_FILE).read_text())
    final_metrics = {key: value for key, value in (result.metrics or {}).items() if not key.startswith("_")}
    if not final_metrics and state["history"]:
        final_metrics = dict(state["history"][-1])
    write_history(output_dir, state["history"], config.train.tensorboard)
    data_summary = {
        "train_uri": config.data.train,
        "val_uri": config.data.val,
        "train_images": train_split.num_rows,
        "val_images": val_split.num_rows if val_split else 0,
        "skipped_images": len(skipped),
        "train_class_counts": train_split.class_counts,
    }
    artifact_uri = output_dir.join("model").uri
    metadata = save_artifact(
        model,
        {
            "class_names": class_names,
            "image_size": tuple(config.data.image_size),
            "channels": config.data.channels,
            "task": task_for(len(class_names)),
            "model_name": config.model.name,
            "metrics": final_metrics,
            "config": config.model_dump(mode="json"),
            "data_summary": data_summary,
        },
        artifact_uri,
        config.storage.endpoint_url,
    )
    logger.info("model artifact %s written to %s", metadata.model_version, artifact_uri)
    return TrainResult(
        artifact_uri=artifact_uri, model_version=metadata.model_version, metrics=final_metrics, history=state["history"]
    )
