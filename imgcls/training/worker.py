"""The per-worker side of Ray Train: what the driver hands each worker (`WorkerPlan`), and the loop
every worker runs (`train_loop_per_worker`: build, restore, train epoch by epoch, checkpoint)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from imgcls.config import JobConfig
from imgcls.errors import clip
from imgcls.tracking.settings import TrackingTarget
from imgcls.training.epoch_sinks import EpochSinks, build_sinks
from imgcls.training.feed import EpochFeed, EvaluationFeed
from imgcls.training.finetune import PhasePlan
from imgcls.training.state import TrainState

logger = logging.getLogger(__name__)


class ShardLayout(BaseModel):
    """The data of one worker-group size: a shard per worker (equal rows, as the collective steps
    require), and the per-worker batch that keeps the global batch of the full group."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    num_workers: int
    batch_size: int  # per worker
    steps_per_epoch: int
    rows_per_worker: int
    train_shards: list[Any]  # one Ray Data shard per worker, equal sizes
    val_shards: list[Any] | None = None
    val_rows: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers


class WorkerPlan(BaseModel):
    """Everything the driver hands the workers (Ray Train's `train_loop_config={"plan": plan}`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: JobConfig
    class_names: list[str]
    # One layout per group size Ray Train may start: just num_workers, or min_workers..num_workers
    # when elastic. Each splits the same images, so every image is seen once per epoch at any size.
    layouts: dict[int, ShardLayout]
    class_weights: list[float] | None = None  # multi-label: the positive weight of each class
    multilabel: bool = False  # the resolved task: a sigmoid per class and 0/1 label vectors
    initial_weights: Any | None = None  # a Ray object reference to the starting weights, or None
    artifact_uri: str | None = None  # where rank 0 writes the model artifact when training ends
    artifact_fields: dict[str, Any] = {}  # its metadata, less the final metrics
    tensorboard_uri: str | None = None  # where rank 0 writes TensorBoard events as epochs end, when train.tensorboard
    profile_paths: list[str] = []  # the images of the artifact's reference profile (imgcls.monitoring)
    profile_source: str = "validation"  # or train_holdout: a slice of train kept out of training for it
    tracking: TrackingTarget | None = None  # the MLflow run rank 0 logs each epoch to (imgcls.tracking)

    @property
    def max_workers(self) -> int:
        return max(self.layouts)

    def layout(self, num_workers: int) -> ShardLayout:
        if num_workers not in self.layouts:
            raise RuntimeError(f"Ray Train started {num_workers} workers; the plan has shards for {sorted(self.layouts)}")
        return self.layouts[num_workers]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one model replica, one shard of the data. Resumes from
    `ray.train.get_checkpoint()` after a restart, or when the same run (same output_dir) is started
    again after the driver died."""
    import ray.data
    import ray.train

    from imgcls.platform import storage
    from imgcls.platform.logs import configure_worker_logging, native_chatter_filtered, verbose

    configure_worker_logging()  # after Ray Data's import: it sets up handlers of its own
    plan: WorkerPlan = loop_config["plan"]
    storage.configure(plan.config.storage)  # the job's retries for the artifact this process writes
    data_context = ray.data.DataContext.get_current()
    # Progress bars of this worker's shard iteration would interleave with the epoch lines.
    data_context.enable_progress_bars = verbose()
    data_context.execution_options.preserve_order = plan.config.train.deterministic
    context = ray.train.get_context()
    layout = plan.layout(context.get_world_size())
    with native_chatter_filtered():  # TensorFlow's start-up, up to its first device probe
        import tensorflow as tf

        # The strategy must exist before TensorFlow runs any op in this process.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        worker = Worker.build(plan, layout, strategy, context.get_world_rank())
    with tensorflow_errors_as_text():
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            worker.restore(checkpoint)
        if worker.rank == 0:
            worker.log_group_size()
        worker.sinks.start(worker.state.history)
        try:
            for epoch in range(worker.state.epoch, plan.config.train.epochs):
                if worker.state.finished:
                    break
                metrics = worker.run_epoch(epoch)
                worker.save_and_report(metrics)
        finally:
            worker.sinks.close()
    if worker.resumed_finished and worker.rank == 0:
        logger.info("training had already finished; nothing left to do")


@contextmanager
def tensorflow_errors_as_text() -> Iterator[None]:
    """A TensorFlow error (a peer lost in the middle of a collective step) leaves the worker as a
    RuntimeError with its message: Ray Train's controller unpickles every worker error, and a
    TensorFlow one would make it import TensorFlow (seconds, and its start-up chatter) before it
    could restart the group."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as error:
        # The message's own traceback of graph nodes ("Detected at node ... File ...") says little.
        lines = [line.strip() for line in str(error.message).splitlines()]
        text = " ".join(line for line in lines if line and not line.startswith(("File ", "Detected at node")))
        raise RuntimeError(f"TensorFlow {type(error).__name__}: {clip(text, 1000)}") from None


@dataclass
class Worker:
    """One replica's model, optimizer, steps, data feed and state, and the epoch that uses them."""

    plan: WorkerPlan
    layout: ShardLayout
    rank: int
    model: Any
    optimizer: Any
    steps: Any
    phases: PhasePlan
    feed: EpochFeed
    validation: EvaluationFeed | None
    state: TrainState
    mixed_precision: bool
    resumed_finished: bool = False
    learning_rate: float | None = None
    started: float = 0.0
    first_epoch: int = 0
    last_checkpoint_at: float = 0.0
    last_checkpoint_seconds: float | None = None
    sinks: EpochSinks = field(default_factory=lambda: EpochSinks([]))

    @classmethod
    def build(cls, plan: WorkerPlan, layout: ShardLayout, strategy, rank: int) -> "Worker":
        import keras
        import ray

        from imgcls.modeling.losses import create_loss
        from imgcls.modeling.models import create_model, create_optimizer
        from imgcls.training.steps import build_steps

        config = plan.config
        mixed_precision = config.train.mixed_precision and config.scaling.use_gpu
        if mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        keras.utils.set_random_seed(config.seed)
        if config.train.deterministic:
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        phases = PhasePlan(config)
        num_classes = len(plan.class_names)
        with strategy.scope():
            model = create_model(
                config.model, tuple(config.data.image_size), config.data.channels, num_classes, plan.multilabel
            )
            optimizer = create_optimizer(config.train.optimizer, config.train.learning_rate)
            if mixed_precision:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            phases.prepare_for_optimizer(model)
            optimizer.build(model.trainable_variables)
        if plan.initial_weights is not None:
            model.set_weights(ray.get(plan.initial_weights))
        loss_function = create_loss(num_classes, config.train.label_smoothing, plan.class_weights, plan.multilabel)
        return cls(
            plan=plan, layout=layout, rank=rank, model=model, optimizer=optimizer,
            steps=build_steps(strategy, model, optimizer, loss_function, num_classes, mixed_precision, plan.multilabel),
            phases=phases,
            feed=EpochFeed(layout.train_shards[rank], config, layout.rows_per_worker, rank, layout.batch_size),
            validation=EvaluationFeed(layout.val_shards[rank], config, layout.val_rows) if layout.val_shards else None,
            state=TrainState(config), mixed_precision=mixed_precision, started=time.perf_counter(),
            last_checkpoint_at=time.perf_counter(), sinks=EpochSinks(build_sinks(plan, rank)),
        )  # fmt: skip

    def restore(self, checkpoint) -> None:
        from imgcls.training.checkpoint import restore_checkpoint

        with checkpoint.as_directory() as directory:
            self.state = restore_checkpoint(directory, self.model, self.optimizer, self.plan.config)
        total = self.plan.config.train.epochs
        if self.rank == 0:
            logger.info("resuming from the checkpoint after epoch %d of %d", self.state.epoch, total)
        self.resumed_finished = self.state.finished
        self.first_epoch = self.state.epoch

    def log_group_size(self) -> None:
        """One line when this group is smaller than planned, or differs from the group that
        trained the last epoch: the global batch and learning rate it trains with."""
        earlier = self.state.history[-1].get("workers") if self.state.history else None
        size, planned = self.layout.num_workers, self.plan.max_workers
        if self.state.finished or (earlier or planned) == size:
            return
        verb = "continuing" if earlier else "starting"
        logger.info(
            "%s with %d of %d workers: global batch %d (%d per worker), learning rate %g as planned",
            verb, size, planned, self.layout.global_batch, self.layout.batch_size, self.plan.config.train.learning_rate,
        )  # fmt: skip

    def set_learning_rate(self, value: float) -> None:
        if value != self.learning_rate:
            target = self.optimizer.inner_optimizer if self.mixed_precision else self.optimizer
            target.learning_rate.assign(value)
            self.learning_rate = value

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate, update the state; returns the epoch's metrics."""
        from imgcls.training.schedules import learning_rate_at
        from imgcls.training.steps import epoch_metrics

        config, steps_per_epoch = self.plan.config, self.layout.steps_per_epoch
        if self.phases.enter(self.model, epoch, log=self.rank == 0):
            self.steps.retrace_train_step()
        epoch_started = time.perf_counter()
        self.state.timings.setdefault("first_epoch_started", time.time())
        local_sums = np.zeros(self.steps.sum_width, dtype=np.float64)
        steps = 0
        for batch in self.feed.batches(epoch):
            if steps == steps_per_epoch:
                raise RuntimeError(f"worker {self.rank} received more than the planned {steps_per_epoch} batches")
            self.set_learning_rate(learning_rate_at(
                config.train.schedule, self.phases.base_learning_rate_at(epoch), epoch * steps_per_epoch + steps,
                steps_per_epoch, config.train.epochs, self.state.plateau.scale,
            ))  # fmt: skip
            local_sums += self.steps.train(batch["image"], batch["label"])
            steps += 1
        if steps != steps_per_epoch:
            # Stopping here (rather than waiting in a collective the others never join) lets Ray
            # Train tear the group down instead of hanging.
            raise RuntimeError(f"worker {self.rank} received {steps} batches, planned {steps_per_epoch}")
        train_sums = self.steps.sum_across_workers(local_sums)
        train_count = train_sums[-1]
        train_seconds = time.perf_counter() - epoch_started
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            **epoch_metrics(train_sums, self.plan.multilabel),
            "learning_rate": float(self.learning_rate),
            "images_per_second": float(train_count / train_seconds),
            "train_images": int(train_count),
            "workers": self.layout.num_workers,
        }
        metrics.update(self.validate())
        metrics["epoch_seconds"] = time.perf_counter() - epoch_started
        self.state.timings["last_epoch_finished"] = time.time()
        self.state.record_epoch(metrics, self.model.get_weights)
        self._finish_epoch(metrics)
        return metrics

    def validate(self) -> dict[str, float]:
        from imgcls.training.steps import epoch_metrics

        if self.validation is None:
            return {}
        sums = np.zeros(self.steps.sum_width, dtype=np.float64)
        for batch in self.validation.batches():
            sums += self.steps.eval(batch["image"], batch["label"])
        return epoch_metrics(self.steps.sum_across_workers(sums), self.plan.multilabel, prefix="val_")

    def validation_predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """Every worker's validation probabilities and 0/1 targets, gathered so that each worker
        holds the whole split (the shards differ in size, so each is padded to the largest)."""
        num_classes = len(self.plan.class_names)
        probabilities, targets = [np.zeros((0, num_classes))], [np.zeros((0, num_classes))]
        for batch in self.validation.batches():
            probabilities.append(self.steps.predict(batch["image"]))
            targets.append(np.asarray(batch["label"], dtype=np.float64))
        local = np.concatenate([np.concatenate(probabilities), np.concatenate(targets)], axis=1)
        sizes = self.steps.gather_across_workers(np.array([len(local)], dtype=np.float64)).astype(int)
        padded = np.zeros((max(int(sizes.max()), 1), 2 * num_classes))
        padded[: len(local)] = local
        gathered = self.steps.gather_across_workers(padded).reshape(len(sizes), len(padded), 2 * num_classes)
        rows = np.concatenate([gathered[worker, :size] for worker, size in enumerate(sizes)])
        return rows[:, :num_classes], rows[:, num_classes:]

    def choose_thresholds(self, metrics: dict[str, Any]) -> str:
        """Multi-label, once training has ended: per-class thresholds maximising each class's F1 on
        the whole validation split, with the final (or restored best) weights; into `metrics`.
        Returns the log line that says what was chosen."""
        from imgcls.training import thresholds as rules

        names = self.plan.class_names
        if self.validation is None:
            metrics["thresholds"] = [rules.DEFAULT_THRESHOLD] * len(names)
            self.state.threshold_metrics = {"thresholds": metrics["thresholds"]}
            return f"no validation split: every class keeps the decision threshold {rules.DEFAULT_THRESHOLD:g}"
        probabilities, targets = self.validation_predictions()
        chosen, class_f1 = rules.choose_thresholds(probabilities, targets)
        metrics["thresholds"] = [round(value, 6) for value in chosen]
        metrics["val_micro_f1_default_threshold"] = rules.micro_f1(probabilities, targets, rules.DEFAULT_THRESHOLD)
        metrics["val_micro_f1_at_thresholds"] = rules.micro_f1(probabilities, targets, metrics["thresholds"])
        metrics["val_exact_match_at_thresholds"] = rules.exact_match(probabilities, targets, metrics["thresholds"])
        metrics["val_class_f1_at_thresholds"] = [round(value, 6) for value in class_f1]
        metrics["val_images_for_thresholds"] = len(targets)
        # Kept in the checkpoint too: a rerun of a finished run writes the artifact from it.
        self.state.threshold_metrics = {key: value for key, value in metrics.items() if "threshold" in key}
        return (
            f"thresholds chosen on {len(targets)} validation images (max F1 per class): "
            + ", ".join(f"{name} {value:.3f}" for name, value in zip(names, metrics["thresholds"]))
            + f"; val micro_f1 {metrics['val_micro_f1_default_threshold']:.4f} at 0.5, "
            f"{metrics['val_micro_f1_at_thresholds']:.4f} at these"
        )

    def _finish_epoch(self, metrics: dict[str, Any]) -> None:
        """Early stopping's weight restore, the replicas' checksums at the end, and the epoch's log line."""
        early, state = self.plan.config.train.early_stopping, self.state
        if state.stopped_early and early.restore_best_weights and state.best_weights is not None:
            self.model.set_weights(state.best_weights)
            metrics["restored_epoch"] = state.stopper.best_epoch
        thresholds_line = self.choose_thresholds(metrics) if state.finished and self.plan.multilabel else None
        if state.finished:
            checksum = float(sum(np.asarray(variable.numpy(), dtype=np.float64).sum() for variable in self.model.weights))
            metrics["weights_checksums"] = [float(value) for value in self.steps.gather_across_workers([checksum])]
            metrics["stopped_early"] = state.stopped_early
        if self.rank == 0:
            logger.info(epoch_line(metrics, self.plan.config.train.epochs, self._eta(metrics["epoch"])))
            self.sinks.epoch_finished(metrics)
            if state.stopped_early:
                logger.info(
                    "early stopping: %s did not improve for %d epochs; %s", early.monitor, early.patience,
                    f"restored the weights of epoch {state.stopper.best_epoch}" if "restored_epoch" in metrics
                    else "keeping the last weights",
                )  # fmt: skip
            if thresholds_line:  # chosen with the weights the model ends with
                logger.info(thresholds_line)

    def _eta(self, epochs_done: int) -> float:
        done = epochs_done - self.first_epoch
        return (time.perf_counter() - self.started) / done * (self.plan.config.train.epochs - epochs_done)

    def save_and_report(self, metrics: dict[str, Any]) -> None:
        """Report the epoch to Ray Train (every epoch, every rank: Tune and the driver follow the
        reports); rank 0 attaches a checkpoint when the cadence says so, and writes the model artifact
        once training has finished."""
        import ray.train

        from imgcls.training.cadence import should_checkpoint
        from imgcls.training.checkpoint import save_checkpoint

        train = self.plan.config.train
        now = time.perf_counter()
        checkpoint = should_checkpoint(
            self.state.epoch, self.state.finished, train.checkpoint_every_epochs, train.checkpoint_interval_s,
            self.last_checkpoint_seconds, metrics["epoch_seconds"], now - self.last_checkpoint_at,
        )  # fmt: skip
        if self.rank != 0 or not checkpoint:
            ray.train.report(metrics)
            return
        if self.state.finished and self.plan.artifact_uri:
            metrics["_model_version"] = self._write_artifact(metrics)
        # Ray Train uploads it in the background and deletes the local copy once it is stored.
        directory = tempfile.mkdtemp(prefix="imgcls-checkpoint-")
        timings = self.state.timings
        timings["checkpoints"] = timings.get("checkpoints", 0) + 1
        save_checkpoint(directory, self.model, self.optimizer, self.state)  # its state counts earlier checkpoints
        metrics["_checkpoint_seconds"] = timings.get("checkpoint_seconds", 0.0) + time.perf_counter() - now
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )  # fmt: skip
        self.last_checkpoint_at = time.perf_counter()
        self.last_checkpoint_seconds = self.last_checkpoint_at - now
        timings["checkpoint_seconds"] = timings.get("checkpoint_seconds", 0.0) + self.last_checkpoint_seconds
        logger.debug("checkpoint after epoch %d: %.2f s", self.state.epoch, self.last_checkpoint_seconds)

    def _write_artifact(self, metrics: dict[str, Any]) -> str:
        """The model artifact from the live model (the driver need not load a checkpoint, nor import
        TensorFlow at all); returns its model_version."""
        from imgcls.modeling.artifact import save_artifact

        final = {key: value for key, value in metrics.items() if not key.startswith("_")}
        fields = {**self.plan.artifact_fields, "metrics": final}
        if self.plan.multilabel:
            fields["thresholds"] = final["thresholds"]
        metadata = save_artifact(
            self.model, fields, self.plan.artifact_uri,
            self.plan.config.storage.endpoint_url, extra_files=artifact_profile_files(self.model, self.plan),
        )  # fmt: skip
        return metadata.model_version


def artifact_profile_files(model, plan: WorkerPlan) -> dict[str, bytes]:
    """The reference profile's files for the artifact (none without profile images)."""
    from imgcls.modeling.artifact import task_for
    from imgcls.monitoring.profile import profile_files
    from imgcls.monitoring.reference import reference_profile

    if not plan.profile_paths:
        return {}
    data = plan.config.data
    decode_arguments = {"image_size": tuple(data.image_size), "channels": data.channels, "max_pixels": data.max_image_pixels,
                        "storage_config": plan.config.storage, "max_bytes": data.max_image_bytes}  # fmt: skip
    task = task_for(len(plan.class_names), plan.multilabel)
    found = reference_profile(model, plan.class_names, task, plan.profile_paths, decode_arguments, plan.profile_source)
    return {} if found is None else profile_files(*found)


def epoch_line(metrics: dict[str, Any], total_epochs: int, eta_seconds: float) -> str:
    """The one log line per epoch a person reads (micro_f1 instead of accuracy for multi-label)."""
    score = "micro_f1" if "micro_f1" in metrics else "accuracy"
    validation = (
        f" val_loss {metrics['val_loss']:.4f} val_{score} {metrics[f'val_{score}']:.4f}" if "val_loss" in metrics else ""
    )
    return (
        f"epoch {metrics['epoch']}/{total_epochs} loss {metrics['loss']:.4f} {score} {metrics[score]:.4f}"
        f"{validation} lr {metrics['learning_rate']:.3g} images/s {metrics['images_per_second']:.0f} "
        f"eta {format_seconds(eta_seconds)}"
    )


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
