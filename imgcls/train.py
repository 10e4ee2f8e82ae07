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
from imgcls.errors import DataError

logger = logging.getLogger(__name__)

CHECKPOINT_MODEL_FILE = "model.keras"
CHECKPOINT_STATE_FILE = "state.json"


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


def epoch_pipeline(shard, config: JobConfig, epoch: int, rank: int):
    """This worker's shard for one epoch: blocks in a new order, then augmented as Ray Data tasks
    (on the CPUs the resource plan keeps for data), so the training process only trains."""
    from imgcls.augment import augment_rows

    pipeline = shard.randomize_block_order(seed=config.seed * 1000 + epoch * 10 + rank)
    if config.augment.is_active:
        pipeline = pipeline.map_batches(
            augment_rows,
            batch_size=config.train.batch_size,
            batch_format="numpy",
            fn_kwargs={"config": config.augment, "seed": config.seed, "epoch": epoch},
        )
    return pipeline


def evaluation_batches(shard, batch_size: int):
    """Validation batches: the decoded pixels exactly as stored, never augmented."""
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one model replica, one shard of the data."""
    import numpy as np
    import ray.train
    import tensorflow as tf

    # The strategy must exist before TensorFlow runs any op in this process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras

    from imgcls.models import create_loss, create_model, create_optimizer

    _configure_worker_logging()
    config = JobConfig.model_validate(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    rows_per_worker: int = loop_config["rows_per_worker"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    world_size = context.get_world_size()
    num_classes = len(class_names)
    binary = num_classes == 2
    batch_size = config.train.batch_size

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = create_model(config.model, tuple(config.data.image_size), config.data.channels, num_classes)
        optimizer = create_optimizer(config.train.optimizer, config.train.learning_rate)
        # Compiling attaches the optimizer so checkpoints carry its state; fit() is never called.
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
    loss_function = create_loss(num_classes)

    def targets_for(labels):
        return tf.cast(tf.expand_dims(labels, -1), tf.float32) if binary else labels

    def correct_count(labels, probabilities):
        if binary:
            predicted = tf.cast(probabilities[:, 0] > 0.5, tf.int32)
        else:
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))

    def replica_train_step(images, labels):
        images = tf.cast(images, tf.float32)
        global_batch_size = tf.shape(labels)[0] * strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example_loss = loss_function(targets_for(labels), probabilities)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch_size)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), correct_count(labels, probabilities), count])

    def replica_eval_step(images, labels):
        probabilities = model(tf.cast(images, tf.float32), training=False)
        per_example_loss = loss_function(targets_for(labels), probabilities)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), correct_count(labels, probabilities), count])

    def local_value(per_replica):
        return strategy.experimental_local_results(per_replica)[0]

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
        return local_value(strategy.run(replica_train_step, args=(images, labels)))

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

    train_shard = loop_config["train_shards"][rank]
    val_shards = loop_config["val_shards"]
    val_shard = val_shards[rank] if val_shards else None
    shuffle_buffer = max(batch_size, min(2048, rows_per_worker))
    history: list[dict[str, Any]] = []
    training_started = time.perf_counter()

    for epoch in range(config.train.epochs):
        epoch_started = time.perf_counter()
        local_sums = np.zeros(3, dtype=np.float64)
        steps = 0
        for batch in epoch_pipeline(train_shard, config, epoch, rank).iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_buffer,
            local_shuffle_seed=config.seed * 1000 + epoch * 10 + rank,
        ):
            if steps == steps_per_epoch:
                raise RuntimeError(f"worker {rank} received more than the planned {steps_per_epoch} batches")
            local_sums += train_step(batch["image"], batch["label"]).numpy()
            steps += 1
        if steps != steps_per_epoch:
            # Stopping here (rather than waiting in a collective the others never join) lets Ray
            # Train tear the group down instead of hanging.
            raise RuntimeError(f"worker {rank} received {steps} batches, planned {steps_per_epoch}")
        train_loss, train_correct, train_count = sum_across_workers(
            tf.constant(local_sums, dtype=tf.float32)
        ).numpy()
        epoch_seconds = time.perf_counter() - epoch_started
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(train_loss / train_count),
            "accuracy": float(train_correct / train_count),
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "images_per_second": float(train_count / epoch_seconds),
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
        last_epoch = epoch + 1 == config.train.epochs
        if last_epoch:
            checksums = gather_across_workers(tf.constant([weights_checksum()], dtype=tf.float64)).numpy()
            metrics["weights_checksums"] = [float(value) for value in checksums]
        if rank == 0:
            elapsed = time.perf_counter() - training_started
            remaining = elapsed / (epoch + 1) * (config.train.epochs - epoch - 1)
            validation = (
                f" val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f}"
                if "val_loss" in metrics
                else ""
            )
            logger.info(
                "epoch %d/%d loss %.4f accuracy %.4f%s lr %.2g images/s %.0f eta %s",
                epoch + 1,
                config.train.epochs,
                metrics["loss"],
                metrics["accuracy"],
                validation,
                metrics["learning_rate"],
                metrics["images_per_second"],
                _format_seconds(remaining),
            )
            with tempfile.TemporaryDirectory(prefix="imgcls-checkpoint-") as checkpoint_dir:
                model.save(Path(checkpoint_dir) / CHECKPOINT_MODEL_FILE)
                state = {"epoch": epoch + 1, "history": history}
                (Path(checkpoint_dir) / CHECKPOINT_STATE_FILE).write_text(json.dumps(state, indent=2))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
        else:
            ray.train.report(metrics)


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


def _write_skipped(output_dir: storage.Location, skipped: list[dict[str, str]]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"path": pa.array([row["path"] for row in skipped], pa.string()),
         "error": pa.array([row["error"] for row in skipped], pa.string())}
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(output_dir.join("skipped_images.parquet"), buffer.getvalue())


def _prepare_data(config: JobConfig):
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
    settings = dict(
        image_size=tuple(config.data.image_size),
        channels=config.data.channels,
        max_pixels=config.data.max_image_pixels,
        decode_batch_size=config.data.decode_batch_size,
        seed=config.seed,
        endpoint_url=endpoint_url,
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
    return images.class_names, train_split, val_split


def run(config: JobConfig) -> TrainResult:
    """Train `config` on the current Ray cluster and write the model artifact to `output_dir/model`."""
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from imgcls.artifact import save_artifact
    from imgcls.models import task_for
    from imgcls.ray_runtime import cluster_totals, ensure_ray
    from imgcls.resources import plan_training

    ensure_ray()
    totals = cluster_totals()
    plan = plan_training(config.scaling, totals["CPU"], totals["GPU"])
    logger.info("resource plan: %s", plan.describe())

    output_dir = storage.resolve(config.output_dir, config.storage.endpoint_url)
    storage.write_text_atomic(output_dir.join("config.yaml"), config_to_yaml(config))
    class_names, train_split, val_split = _prepare_data(config)
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
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers, use_gpu=config.scaling.use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=output_dir.join("checkpoints").path,
            storage_filesystem=None if output_dir.is_local else output_dir.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=0),
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

    with result.checkpoint.as_directory() as checkpoint_dir:
        model = keras.saving.load_model(Path(checkpoint_dir) / CHECKPOINT_MODEL_FILE, compile=False, safe_mode=True)
        state = json.loads((Path(checkpoint_dir) / CHECKPOINT_STATE_FILE).read_text())
    final_metrics = {key: value for key, value in result.metrics.items() if not key.startswith("_")}
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
