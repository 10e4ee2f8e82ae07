"""The training job's driver: list and decode the data, plan resources, run Ray Train with
`imgcls.training.worker.train_loop_per_worker` on every worker, and write the model artifact."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from pydantic import BaseModel

from imgcls.config import JobConfig, config_to_yaml, metric_mode
from imgcls.errors import ConfigError, DataError, JobFailedError, user_errors_from_ray
from imgcls.platform import storage
from imgcls.reporting.history import write_history
from imgcls.training.feed import data_task_cpus

logger = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """What a training run produced."""

    model_config = {"protected_namespaces": ()}

    artifact_uri: str
    model_version: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    registered_as: str | None = None  # models:/NAME/VERSION with tracking.register_as


def _write_augmentation_samples(output_dir: storage.Location, dataset, config: JobConfig) -> None:
    """A grid of training images as the model sees them: each original, then one augmentation per epoch."""
    import io

    from imgcls.data.augment import describe, sample_grid

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


def _write_skipped(output_dir: storage.Location, skipped: list[dict[str, str]]) -> None:
    import pyarrow as pa

    table = pa.table(
        {"path": pa.array([row["path"] for row in skipped], pa.string()),
         "error": pa.array([row["error"] for row in skipped], pa.string())}
    )  # fmt: skip
    storage.write_parquet_atomic(output_dir.join("skipped_images.parquet"), table)


def _list_data(config: JobConfig):
    """List and split the labelled images (cheap), in the form of the run's task (see
    imgcls.training.task): returns class names, train and val listings, and whether it is multi-label."""
    from imgcls.data import listing
    from imgcls.training.task import conform, resolve_multilabel

    endpoint_url = config.storage.endpoint_url
    images = listing.list_labelled(config.data.train, endpoint_url)
    multilabel = resolve_multilabel(config.model.task, images)
    images = conform(images, multilabel, "data.train")
    if config.data.val:
        train_images = images
        val_images = conform(listing.list_labelled(config.data.val, endpoint_url), multilabel, "data.val")
        listing.check_known_classes(val_images, images.class_names, "data.val", "data.train")
        val_images.class_names = images.class_names
    else:
        train_images, val_images = listing.stratified_split(images, config.data.val_fraction, config.seed)
    unlabelled = f", {images.unlabelled_count()} with no label" if multilabel else ""
    logger.info(
        "found %d labelled images in %d classes under %s (%d other files ignored)%s; task %s",
        len(images.paths), len(images.class_names), config.data.train, images.ignored, unlabelled,
        "multilabel" if multilabel else ("binary" if len(images.class_names) == 2 else "multiclass"),
    )  # fmt: skip
    return images.class_names, train_images, val_images, multilabel


def check_monitors(config: JobConfig, multilabel: bool) -> None:
    """Every metric the run watches (early stopping, reduce_on_plateau, checkpoint ranking) must be one
    it reports: a multi-label run has micro_f1 and exact_match, not accuracy."""
    from imgcls.training.task import MULTILABEL_METRICS, SINGLE_LABEL_METRICS

    reported = MULTILABEL_METRICS if multilabel else SINGLE_LABEL_METRICS
    train = config.train
    watched = [("train.checkpoint_monitor", train.checkpoint_monitor)]
    if train.early_stopping.enabled:
        watched.append(("train.early_stopping.monitor", train.early_stopping.monitor))
    if train.schedule.name == "reduce_on_plateau":
        watched.append(("train.schedule.monitor", train.schedule.monitor))
    for key, monitor in watched:
        if monitor.removeprefix("val_") not in reported:
            kind = "a multi-label" if multilabel else "a single-label"
            raise ConfigError(
                f"{key} is '{monitor}', but {kind} run reports {', '.join(reported)} (and val_ of each with "
                f"validation). Use one of those, e.g. {'val_micro_f1' if multilabel else 'val_accuracy'} or val_loss."
            )


def _decode_data(config: JobConfig, train_images, val_images):
    """Decode both splits into the object store; fail when a class has nothing readable."""
    from imgcls.data.datasets import prepare_split

    settings = dict(
        image_size=tuple(config.data.image_size),
        channels=config.data.channels,
        max_pixels=config.data.max_image_pixels,
        max_bytes=config.data.max_image_bytes,
        decode_batch_size=config.data.decode_batch_size,
        seed=config.seed,
        storage_config=config.storage,
        num_cpus=data_task_cpus(config),
    )
    train_split = prepare_split(train_images, split_name="train", **settings)
    empty = [name for name, count in train_split.class_counts.items() if count == 0]
    if train_split.num_rows == 0:
        raise DataError(f"None of the {len(train_images.paths)} training images under {config.data.train} is readable.")
    if empty:
        raise DataError(
            f"Class(es) {empty} have no readable training images after skipping unreadable files (for "
            "multi-label data: no readable image carrying them); add images or remove those classes."
        )
    val_split = prepare_split(val_images, split_name="val", **settings) if val_images else None
    return train_split, val_split


def run(config: JobConfig, callbacks: list | None = None, plan_with_free_cpus: bool = True,
        tracking_tags: dict[str, str] | None = None) -> TrainResult:  # fmt: skip
    """Train `config` on the current Ray cluster and write the model artifact to `output_dir/model`;
    with tracking on (imgcls.tracking), in an MLflow run that a rerun into the same output_dir continues.

    `callbacks` are Ray Train callbacks (Ray Tune passes its report callback here). A Tune trial
    plans with the cluster's total CPUs (`plan_with_free_cpus=False`): the search already gave it
    its share, and CPUs a stopped trial is still releasing are worth waiting for. `tracking_tags`
    go on the MLflow run besides its own (a trial's: its parent search run and name)."""
    from imgcls.tracking.settings import check_registration, tracking_uri

    started = time.time()
    storage.configure(config.storage)
    output_dir = storage.resolve(config.output_dir, config.storage.endpoint_url)
    _check_resumable(output_dir, config)
    tracked = None
    check_registration(config.tracking)
    if tracking_uri(config.tracking) is not None:  # MLflow is imported only then
        from imgcls.tracking.training_run import start_training_run

        tracked = start_training_run(config, output_dir, tracking_tags)  # exit 2 when its server does not answer
    try:
        result = _train(config, output_dir, tracked, callbacks, plan_with_free_cpus, started)
    except BaseException as error:
        if tracked is not None:
            tracked.failed(killed=isinstance(error, KeyboardInterrupt))
        raise
    if tracked is not None:
        tracked.finished(result.model_version)
        if config.tracking.register_as:
            result.registered_as = tracked.register(config.tracking.register_as, result.model_version)
    return result


def _train(config: JobConfig, output_dir: storage.Location, tracked, callbacks: list | None, plan_with_free_cpus: bool,
           started: float) -> TrainResult:  # fmt: skip
    """The training itself: data, Ray Train, the artifact and the history (`tracked`: the MLflow run or None)."""
    from imgcls.modeling.artifact import task_for
    from imgcls.modeling.initial_weights import prepare_initial_weights
    from imgcls.platform.ray_runtime import cluster_totals, ensure_ray, free_resources
    from imgcls.platform.resources import plan_training
    from imgcls.monitoring.reference import profile_sample
    from imgcls.training.checkpoint import load_final_model, read_final_state
    from imgcls.training.worker import artifact_profile_files

    ray_started = time.time()
    ensure_ray()
    phases = {"ray_s": time.time() - ray_started}
    totals = free_resources() if plan_with_free_cpus else cluster_totals()
    resources = plan_training(config.scaling, totals["CPU"], totals["GPU"])
    logger.info("resource plan: %s", resources.describe())

    storage.write_text_atomic(output_dir.join("config.yaml"), config_to_yaml(config))
    class_names, train_images, val_images, multilabel = _list_data(config)
    train_images, profile_images, profile_source = _profile_images(config, train_images, val_images)
    check_monitors(config, multilabel)
    if config.train.deterministic:  # decoded blocks, and so the shards, in the listing's seeded order
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Before decoding: a missing weights file or an offline ImageNet download fails in seconds.
    initial_weights = prepare_initial_weights(config, class_names, multilabel)
    train_split, val_split = _decode_data(config, train_images, val_images)
    skipped = train_split.skipped + (val_split.skipped if val_split else [])
    _write_skipped(output_dir, skipped)
    _write_augmentation_samples(output_dir, train_split.dataset, config)
    data_summary = {
        "train_uri": config.data.train,
        "val_uri": config.data.val,
        "train_images": train_split.num_rows,
        "val_images": val_split.num_rows if val_split else 0,
        "skipped_images": len(skipped),
        "train_class_counts": train_split.class_counts,
        "task": task_for(len(class_names), multilabel),
    }
    if multilabel:
        data_summary.update(_multilabel_summary(train_split, val_split))
    if tracked is not None:
        tracked.data_ready(data_summary)
    worker_plan = _worker_plan(config, class_names, train_split, val_split, resources, initial_weights, multilabel)
    worker_plan.tracking = tracked.target if tracked is not None else None
    worker_plan.artifact_uri = output_dir.join("model").uri
    worker_plan.artifact_fields = _artifact_fields(config, class_names, data_summary, multilabel)
    if config.train.tensorboard:
        worker_plan.tensorboard_uri = output_dir.join("tensorboard").uri
    if profile_images is not None:
        worker_plan.profile_paths = profile_sample(profile_images.paths, config.seed)
        worker_plan.profile_source = profile_source
    trainer = _trainer(config, worker_plan, resources, output_dir, callbacks)
    phases["data_s"] = time.time() - ray_started - phases["ray_s"]
    fit_started = time.time()
    logger.info(
        "training %s on %d images (%d steps of %d per worker and epoch), %d validation images", config.model.name,
        train_split.num_rows, worker_plan.layout(resources.num_workers).steps_per_epoch, config.train.batch_size,
        val_split.num_rows if val_split else 0,
    )  # fmt: skip
    # The endpoint failing under a worker writing the artifact, or under Ray Train's own checkpoint
    # reads and writes: the user's error, naming it.
    with storage.endpoint_failures_named(output_dir.join("checkpoints"), "keep checkpoints in"), user_errors_from_ray():
        result = _fit(trainer, config, resources, output_dir)
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the worker logs above")
    with result.checkpoint.as_directory() as checkpoint_dir:
        state = read_final_state(checkpoint_dir)
        final_metrics = {key: value for key, value in (result.metrics or {}).items() if not key.startswith("_")}
        if not final_metrics and state["history"]:
            final_metrics = {**state["history"][-1], **state.get("threshold_metrics", {})}
        model_version = (result.metrics or {}).get("_model_version")
        if model_version is None:
            # Rank 0 writes the artifact from the live model as training ends; a run that had already
            # finished before this one resumed it never got there, so it comes from the checkpoint.
            model, _ = load_final_model(checkpoint_dir)
            model_version = _write_artifact(
                config, model, class_names, final_metrics, data_summary, output_dir, multilabel,
                artifact_profile_files(model, worker_plan),
            )  # fmt: skip
    fit_ended = time.time()
    write_history(output_dir, state["history"])
    artifact_uri = worker_plan.artifact_uri
    logger.info("model artifact %s written to %s", model_version, artifact_uri)
    _report_phases(output_dir, phases, state, result.metrics or {}, fit_started, fit_ended, started)
    return TrainResult(artifact_uri=artifact_uri, model_version=model_version, metrics=final_metrics, history=state["history"])


def _report_phases(output_dir, phases: dict[str, float], state: dict, metrics: dict, fit_started: float,
                   fit_ended: float, started: float) -> None:  # fmt: skip
    """Where this run's time went, in timings.json and one log line: Ray's start, listing and
    decoding, the workers' start-up before the first epoch, the epochs (of which checkpoints), and
    the end of training to the written artifact and history."""
    timings = state.get("timings", {})
    epochs = sum(entry.get("epoch_seconds", 0.0) for entry in state["history"])
    phases.update(
        workers_start_s=max(0.0, timings.get("first_epoch_started", fit_started) - fit_started),
        epochs_s=epochs,
        checkpoint_s=metrics.get("_checkpoint_seconds", timings.get("checkpoint_seconds", 0.0)),
        checkpoints=timings.get("checkpoints", 0),
        teardown_s=max(0.0, fit_ended - timings.get("last_epoch_finished", fit_ended)),
        history_s=time.time() - fit_ended,
        total_s=time.time() - started,
    )
    phases = {key: round(value, 3) if isinstance(value, float) else value for key, value in phases.items()}
    storage.write_text_atomic(output_dir.join("timings.json"), json.dumps(phases, indent=2))
    logger.info(
        "took %.1f s: Ray %.1f s, data %.1f s, workers' start %.1f s, %d epochs %.1f s (%d checkpoints %.1f s), "
        "end of training to artifact %.1f s", phases["total_s"], phases["ray_s"], phases["data_s"],
        phases["workers_start_s"], len(state["history"]), phases["epochs_s"], phases["checkpoints"],
        phases["checkpoint_s"], phases["teardown_s"] + phases["history_s"],
    )  # fmt: skip


def _multilabel_summary(train_split, val_split) -> dict[str, Any]:
    """Images with no label, and labels per image, of each split of a multi-label run."""
    summary = {
        "train_unlabelled_images": train_split.unlabelled,
        "train_label_cardinality": round(train_split.label_cardinality, 4),
    }
    if val_split is not None:
        summary.update(
            val_unlabelled_images=val_split.unlabelled,
            val_label_cardinality=round(val_split.label_cardinality, 4),
            val_class_counts=val_split.class_counts,
        )
    return summary


def _worker_plan(config: JobConfig, class_names: list[str], train_split, val_split, resources, initial_weights,
                 multilabel: bool = False):  # fmt: skip
    """What every worker gets: the shards of every group size Ray Train may start (see `_layout`),
    the class weights and the starting weights."""
    import ray

    from imgcls.modeling.losses import class_weight_vector, positive_weight_vector
    from imgcls.training.worker import WorkerPlan

    if train_split.num_rows // resources.num_workers == 0:
        raise DataError(
            f"Only {train_split.num_rows} training images for scaling.num_workers={resources.num_workers}: "
            "each worker needs at least one image."
        )
    try:
        if multilabel:
            class_weights = positive_weight_vector(
                config.train.class_weights, class_names, train_split.class_counts, train_split.num_rows
            )
        else:
            class_weights = class_weight_vector(config.train.class_weights, class_names, train_split.class_counts)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    has_validation = val_split is not None and val_split.num_rows > 0
    if config.train.early_stopping.enabled and config.train.early_stopping.monitor.startswith("val_") and not has_validation:
        raise ConfigError(
            f"train.early_stopping.monitor is '{config.train.early_stopping.monitor}' but there is no validation "
            "set: set data.val or data.val_fraction > 0, or monitor 'loss'."
        )
    sizes = range(resources.fewest_workers, resources.num_workers + 1)
    return WorkerPlan(
        config=config, class_names=class_names,
        layouts={size: _layout(config, train_split, val_split if has_validation else None, size, resources.num_workers)
                 for size in sizes},
        class_weights=class_weights, multilabel=multilabel,
        initial_weights=ray.put(initial_weights) if initial_weights is not None else None,
    )  # fmt: skip


def _layout(config: JobConfig, train_split, val_split, num_workers: int, max_workers: int):
    """Equal shards for `num_workers` workers (every worker runs the same number of steps, as the
    collective all-reduce requires; at most num_workers - 1 images per epoch are left out), each
    with the batch that keeps the global batch of `max_workers` workers: a smaller elastic group
    trains with the same global batch and learning rate, and about the same steps per epoch."""
    from imgcls.training.worker import ShardLayout

    rows_per_worker = train_split.num_rows // num_workers
    batch_size = per_worker_batch(config.train.batch_size, max_workers, num_workers)
    return ShardLayout(
        num_workers=num_workers, batch_size=batch_size, steps_per_epoch=math.ceil(rows_per_worker / batch_size),
        rows_per_worker=rows_per_worker, train_shards=train_split.dataset.split(num_workers, equal=True),
        val_shards=val_split.dataset.split(num_workers, equal=False) if val_split is not None else None,
        val_rows=math.ceil(val_split.num_rows / num_workers) if val_split is not None else 0,
    )  # fmt: skip


def _fit(trainer, config: JobConfig, resources, output_dir: storage.Location):
    """`trainer.fit()` with each start of the worker group bounded, failing with the cluster's
    side of the story when the workers could not be scheduled within scaling.reschedule_timeout_s."""
    from imgcls.platform.ray_runtime import live_node_ids
    from imgcls.training.scheduling import (
        find_not_scheduled,
        not_scheduled_message,
        start_attempt_seconds,
        worker_group_start_timeout,
    )

    _report_missing_resources(config, resources)
    if resources.elastic and config.train.max_failures == 0:
        logger.info(
            "scaling.min_workers is set but train.max_failures is 0: a lost worker still ends the run "
            "(set train.max_failures to continue with fewer workers)"
        )
    known_nodes = live_node_ids()  # so that a node gone by the end is named
    try:
        with worker_group_start_timeout(start_attempt_seconds(config.scaling.reschedule_timeout_s, resources.elastic)):
            return trainer.fit()
    except Exception as error:
        not_scheduled = find_not_scheduled(error)
        if not_scheduled is None:
            raise
        checkpoints = output_dir.join("checkpoints").uri
        raise JobFailedError(not_scheduled_message(not_scheduled, resources, checkpoints, known_nodes)) from None


def _report_missing_resources(config: JobConfig, resources) -> None:
    """Custom resources the cluster lacks now may still come (an autoscaler adds nodes, an operator
    starts one): say what the job waits for, and for how long."""
    import ray

    total = ray.cluster_resources()
    short = {
        name: amount * resources.fewest_workers
        for name, amount in resources.custom_resources.items()
        if float(total.get(name, 0.0)) < amount * resources.fewest_workers - 1e-9
    }
    if short:
        logger.info(
            "the workers need %s; the cluster has %s now: waiting up to scaling.reschedule_timeout_s=%g s for them",
            ", ".join(f"{amount:g} {name}" for name, amount in short.items()),
            ", ".join(f"{float(total.get(name, 0.0)):g} {name}" for name in short), config.scaling.reschedule_timeout_s,
        )  # fmt: skip


def per_worker_batch(batch_size: int, max_workers: int, num_workers: int) -> int:
    """The global batch is train.batch_size x scaling.num_workers whatever the group's size: each of
    `num_workers` workers takes its share, rounded up (the global batch may grow by at most
    num_workers - 1 images), so the learning rate and its schedule stay valid."""
    return math.ceil(batch_size * max_workers / num_workers)


def _trainer(config: JobConfig, worker_plan, resources, output_dir: storage.Location, callbacks: list | None):
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from imgcls.platform.logs import verbose, worker_environment
    from imgcls.training.backend import MultiWorkerConfig
    from imgcls.training.scheduling import ScheduleDeadline
    from imgcls.training.worker import train_loop_per_worker

    monitor = config.train.checkpoint_monitor if worker_plan.layout(resources.num_workers).val_shards else "loss"
    # Elastic: Ray Train starts as many workers as fit, between the two, and resizes as nodes come and go.
    num_workers = (resources.fewest_workers, resources.num_workers) if resources.elastic else resources.num_workers
    return DataParallelTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": worker_plan},
        backend_config=MultiWorkerConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=config.scaling.use_gpu, resources_per_worker=resources.resources_per_worker()
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=output_dir.join("checkpoints").path,
            storage_filesystem=None if output_dir.is_local else output_dir.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            callbacks=[*(callbacks or []), ScheduleDeadline(config.scaling.reschedule_timeout_s)],
            # Ray Train's own INFO lines (worker group start, each report) only when verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            worker_runtime_env={"env_vars": worker_environment()},
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.checkpoints_to_keep,
                checkpoint_score_attribute=monitor,
                checkpoint_score_order=metric_mode(monitor),
            ),
        ),
    )


def _artifact_fields(config: JobConfig, class_names: list[str], data_summary: dict[str, Any],
                     multilabel: bool = False) -> dict[str, Any]:  # fmt: skip
    """The artifact's metadata but for the final metrics (and multi-label thresholds), known before training starts."""
    from imgcls.modeling.artifact import task_for

    return {
        "class_names": class_names,
        "image_size": tuple(config.data.image_size),
        "channels": config.data.channels,
        "task": task_for(len(class_names), multilabel),
        "model_name": config.model.name,
        "config": config.model_dump(mode="json"),
        "data_summary": data_summary,
    }


def _write_artifact(config: JobConfig, model, class_names: list[str], metrics: dict[str, Any], data_summary: dict[str, Any],
                    output_dir: storage.Location, multilabel: bool = False,
                    extra_files: dict[str, bytes] | None = None) -> str:  # fmt: skip
    from imgcls.modeling.artifact import save_artifact

    fields = {**_artifact_fields(config, class_names, data_summary, multilabel), "metrics": metrics}
    if multilabel:
        fields["thresholds"] = metrics.get("thresholds") or [0.5] * len(class_names)
    destination = output_dir.join("model").uri
    return save_artifact(model, fields, destination, config.storage.endpoint_url, extra_files).model_version


def _profile_images(config: JobConfig, train_images, val_images):
    """The images of the artifact's reference profile: the validation split, or without one a
    slice of train held out of training (data.profile_holdout_fraction). Returns (train images,
    profile images or None, their source)."""
    from imgcls.data import listing

    if val_images is not None and val_images.paths:
        return train_images, val_images, "validation"
    fraction = config.data.profile_holdout_fraction
    if fraction <= 0:
        logger.info("no validation split and data.profile_holdout_fraction 0: the artifact gets no reference profile")
        return train_images, None, "validation"
    kept, held_out = listing.stratified_split(train_images, fraction, config.seed + 1)
    if held_out is None or not held_out.paths:
        return train_images, None, "validation"
    logger.info(
        "no validation split: %d of %d training images held out of training for the reference profile "
        "(data.profile_holdout_fraction %g)", len(held_out.paths), len(train_images.paths), fraction,
    )  # fmt: skip
    return kept, held_out, "train_holdout"
