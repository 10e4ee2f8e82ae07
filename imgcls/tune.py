"""Hyperparameter search with Ray Tune. Each trial is one complete imgcls training run (the Train V2
pattern: a Tune function builds and fits its own TensorflowTrainer), with its own output_dir, so a
trial resumes from its checkpoints like any training run and ends with a real artifact."""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from imgcls.config import JobConfig, TuneSettings, build_model, config_to_yaml, set_dotted
from imgcls.errors import ConfigError, ResourcePlanError, UserError, user_error_in
from imgcls.platform import storage
from imgcls.platform.resources import MIN_CPUS_PER_WORKER

if TYPE_CHECKING:
    from imgcls.tracking.search_run import SearchRun
    from imgcls.tracking.settings import TrackingTarget

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "tune"
# A trial's own process only drives its trainer; Tune refuses a zero request, so it asks for a sliver.
TRIAL_DRIVER_CPUS = 0.01
TRIALS_FOLDER = "trials"


class TuningPlan(BaseModel):
    max_concurrent_trials: int
    cpus_per_worker: float
    data_cpus: float

    def describe(self, num_workers: int) -> str:
        return (
            f"{self.max_concurrent_trials} trial(s) at a time, each {num_workers} worker(s) x "
            f"{self.cpus_per_worker:g} CPU + {self.data_cpus:g} CPU for Ray Data"
        )


class TrialSummary(BaseModel):
    trial_id: str
    status: str
    epochs: int
    metric_last: float | None
    metric_best: float | None
    params: dict[str, Any]
    artifact_uri: str | None
    error: str | None = None


class TuneResult(BaseModel):
    best_trial_id: str
    best_metric: float
    best_config_uri: str
    artifact_uri: str
    trials: list[TrialSummary]


def plan_tuning(config: JobConfig, cluster_cpus: float) -> TuningPlan:
    """Trials run side by side on equal shares of the cluster. Each share keeps CPU for Ray Data,
    because training workers that take every CPU starve the data pipeline and hang, and the
    reservations of all trials together leave at least one whole CPU, which Ray Data's own
    filter and split tasks need."""
    settings, scaling = config.tune, config.scaling
    workers = scaling.num_workers
    if scaling.cpus_per_worker is not None:
        per_trial = workers * scaling.cpus_per_worker + scaling.data_cpus + TRIAL_DRIVER_CPUS
        possible = int((cluster_cpus + 1e-9) // per_trial)
        concurrent = min(settings.max_concurrent_trials or possible, possible)
        cpus_per_worker, data_cpus = scaling.cpus_per_worker, scaling.data_cpus
    else:
        # Unset: a whole CPU per worker plus the configured data CPUs, as a training run would get.
        per_trial = workers + scaling.data_cpus
        concurrent = settings.max_concurrent_trials or max(1, int((cluster_cpus + 1e-9) // per_trial))
        share = cluster_cpus / concurrent
        data_cpus = min(scaling.data_cpus, share / 2)
        # The trial's own process takes its sliver from the workers' part, not from the data part.
        cpus_per_worker = min(1.0, (share - data_cpus - TRIAL_DRIVER_CPUS) / workers)
    reserved = concurrent * (workers * cpus_per_worker + TRIAL_DRIVER_CPUS)
    if concurrent < 1 or cpus_per_worker < MIN_CPUS_PER_WORKER or data_cpus < 0.25 or cluster_cpus - reserved < 1 - 1e-9:
        # Bounded by the smallest workers beside one whole CPU left free, and by a data share of at
        # least a quarter CPU (half of each trial's share of at least half a CPU).
        most = max(1, min(int((cluster_cpus - 1) // (workers * MIN_CPUS_PER_WORKER + TRIAL_DRIVER_CPUS)),
                          int(cluster_cpus * 2)))  # fmt: skip
        raise ResourcePlanError(
            f"{concurrent or settings.max_concurrent_trials} concurrent trial(s) of {workers} worker(s) do not fit "
            f"a {cluster_cpus:g}-CPU cluster with CPU left for Ray Data. Use at most {most} "
            "concurrent trials (tune.max_concurrent_trials), lower scaling.cpus_per_worker, or add CPUs."
        )
    return TuningPlan(
        max_concurrent_trials=concurrent, cpus_per_worker=round(cpus_per_worker, 4), data_cpus=round(data_cpus, 4)
    )


def _domain_values(kind: str, values: list[Any]) -> list[Any]:
    """Values that stand for a domain when checking it against the config (all choices, both bounds)."""
    if kind == "randint":
        return [values[0], values[1] - 1]
    return list(values)


def check_search_space(config: JobConfig) -> None:
    """Every key must exist and every value must be valid: fail now, not in trial 7 an hour later."""
    base = config.model_dump(mode="json")
    for key, domain in config.tune.search_space.items():
        if key.startswith("scaling."):
            raise ConfigError(f"tune.search_space: {key} cannot be searched; trials share the cluster by plan.")
        (kind, values), = domain.items()
        for value in _domain_values(kind, values):
            candidate = set_dotted(base, key, value)
            build_model(JobConfig, candidate, f"tune.search_space ({key}={value!r})")
    if config.tune.metric.startswith("val_") and not config.data.val and config.data.val_fraction == 0:
        raise ConfigError(
            f"tune.metric is {config.tune.metric} but there is no validation set: set data.val or "
            "data.val_fraction > 0, or tune on a training metric such as accuracy."
        )


def resolve_metric(config: JobConfig) -> JobConfig:
    """`config` with a tune.metric the trials report. Multi-label runs report micro_f1 and
    exact_match instead of accuracy: the default metric (val_accuracy) becomes val_micro_f1 for them;
    an accuracy metric named in the config is an error, as is a multi-label metric for single-label data."""
    from imgcls.data.listing import list_labelled
    from imgcls.training.task import MULTILABEL_METRICS, SINGLE_LABEL_METRICS, resolve_multilabel

    settings = config.tune
    name = settings.metric.removeprefix("val_")
    multilabel = resolve_multilabel(config.model.task, list_labelled(config.data.train, config.storage.endpoint_url))
    reported = MULTILABEL_METRICS if multilabel else SINGLE_LABEL_METRICS
    if name in reported or name not in SINGLE_LABEL_METRICS + MULTILABEL_METRICS:
        return config  # a reported score, or another reported number (images_per_second, ...)
    if multilabel and name == "accuracy" and "metric" not in settings.model_fields_set:
        metric = settings.metric.replace("accuracy", "micro_f1")
        logger.info("multi-label data: trials are ranked by %s (tune.metric's default %s is single-label)",
                    metric, settings.metric)  # fmt: skip
        return config.model_copy(update={"tune": settings.model_copy(update={"metric": metric})})
    kind = "multi-label" if multilabel else "single-label"
    raise ConfigError(
        f"tune.metric is {settings.metric}, but the trials train on {kind} data and report "
        f"{', '.join(reported)} (val_ of each with validation). Set tune.metric to one of those, e.g. "
        f"{'val_micro_f1' if multilabel else 'val_accuracy'}."
    )


def tune_search_space(settings: TuneSettings) -> dict[str, Any]:
    from ray import tune

    builders = {
        "choice": lambda values: tune.choice(values),
        "grid": lambda values: tune.grid_search(values),
        "uniform": lambda values: tune.uniform(*values),
        "loguniform": lambda values: tune.loguniform(*values),
        "randint": lambda values: tune.randint(*values),
    }
    space = {}
    for key, domain in settings.search_space.items():
        (kind, values), = domain.items()
        space[key] = builders[kind](values)
    return space


def max_epochs(config: JobConfig) -> int:
    domain = config.tune.search_space.get("train.epochs")
    if not domain:
        return config.train.epochs
    (kind, values), = domain.items()
    return int(max(_domain_values(kind, values)))


def trial_config(base_values: dict[str, Any], params: dict[str, Any], output_uri: str) -> JobConfig:
    values = dict(base_values)
    for key, value in params.items():
        values = set_dotted(values, key, value)
    values["output_dir"] = output_uri
    values["tune"] = None
    # Trials are candidates: only a training of best_config.yaml registers a model (tracking.register_as).
    values["tracking"] = {**values.get("tracking", {}), "register_as": None}
    return build_model(JobConfig, values, "trial config")


def run_trial(params: dict[str, Any], base_values: dict[str, Any], trials_uri: str, base_dir: str,
              search_run: TrackingTarget | None = None) -> None:  # fmt: skip
    """One Tune trial: a whole training run in `trials/<trial_id>`, its reports forwarded to Tune;
    tracked, its MLflow run is nested under the search's (`search_run`)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from imgcls import train
    from imgcls.platform.logs import configure_worker_logging

    configure_worker_logging()
    # Tune runs trials in their own working directories: relative paths keep meaning the driver's.
    os.environ["IMGCLS_BASE_DIR"] = base_dir
    # Several trials' progress bars interleaved in one driver log are unreadable; Tune reports progress.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(base_values, params, f"{trials_uri.rstrip('/')}/{trial_id}")
    logger.info("trial %s: %s", trial_id, ", ".join(f"{key}={value}" for key, value in params.items()))
    tracking_tags = None
    if search_run is not None:
        from imgcls.tracking.settings import TRACKING_URI_VARIABLE
        from imgcls.tracking.tags import trial_tags

        # The driver's server, even where the trial's process lacks the driver's environment.
        os.environ[TRACKING_URI_VARIABLE] = search_run.tracking_uri
        tracking_tags = trial_tags(search_run.run_id, trial_id, list(params))
    train.run(config, callbacks=[TuneReportCallback()], plan_with_free_cpus=False, tracking_tags=tracking_tags)


def _metric_history(result, metric: str) -> list[tuple[int, float]]:
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "epoch" not in frame:
        return []
    return [(int(epoch), float(value)) for epoch, value in zip(frame["epoch"], frame[metric]) if value == value]


def summarise_trials(
    result_grid, config: JobConfig, trials_root: storage.Location
) -> tuple[list[TrialSummary], dict[str, list[tuple[int, float]]]]:
    """One summary per trial (sorted by id), and each trial's metric per epoch."""
    import json
    from pathlib import PurePosixPath

    settings = config.tune
    mode = settings.resolved_mode()
    summaries, histories = [], {}
    for result in result_grid:
        trial_id = PurePosixPath(result.path).name
        history = histories[trial_id] = _metric_history(result, settings.metric)
        values = [value for _, value in history]
        epochs = max((epoch for epoch, _ in history), default=0)
        artifact = trials_root.join(trial_id, "model")
        metadata_location = artifact.join("metadata.json")
        finished = storage.exists(metadata_location)
        if result.error is not None:
            status = "error"
        elif finished:
            stopped_early = json.loads(storage.read_bytes(metadata_location)).get("metrics", {}).get("stopped_early")
            status = "early_stopped" if stopped_early else "completed"
        elif epochs:
            status = "stopped_by_asha"
        else:
            status = "not_run"
        summaries.append(
            TrialSummary(
                trial_id=trial_id,
                status=status,
                epochs=epochs,
                metric_last=values[-1] if values else None,
                metric_best=(min(values) if mode == "min" else max(values)) if values else None,
                params={key: result.config.get(key) for key in settings.search_space},
                artifact_uri=artifact.uri if finished else None,
                error=_error_message(result.error) if result.error is not None else None,
            )
        )
    return sorted(summaries, key=lambda summary: summary.trial_id), histories


def _error_message(error: BaseException) -> str:
    """The exception line of a trial's error (Ray wraps it in its own traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(error))[:500]


def trials_table_csv(trials: list[TrialSummary], metric: str) -> str:
    keys = sorted({key for trial in trials for key in trial.params})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["trial_id", "status", "epochs", f"{metric}_last", f"{metric}_best", *keys, "artifact_uri", "error"])
    for trial in trials:
        writer.writerow(
            [trial.trial_id, trial.status, trial.epochs, trial.metric_last, trial.metric_best,
             *[trial.params.get(key) for key in keys], trial.artifact_uri or "", trial.error or ""]
        )  # fmt: skip
    return text.getvalue()


def _best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary:
    finished = [trial for trial in trials if trial.artifact_uri and trial.metric_last is not None]
    if not finished:
        errors = [trial.error for trial in trials if trial.error]
        message = f"No trial finished with a model; first error: {errors[0] if errors else 'none reported'}."
        if errors and all(user_error_in(error) is not None for error in errors):
            raise UserError(message.replace("imgcls.errors.", ""))
        raise RuntimeError(message)
    sign = 1 if mode == "max" else -1
    return max(finished, key=lambda trial: sign * trial.metric_last)


def _copy_artifact(source: storage.Location, destination: storage.Location) -> None:
    from imgcls.modeling.artifact import METADATA_FILE, MODEL_FILE
    from imgcls.monitoring.profile import PROFILE_ARRAYS, PROFILE_FILE

    # metadata.json last: a folder with metadata.json is always a complete artifact. The reference
    # profile goes with it where the trial wrote one.
    for name in (MODEL_FILE, PROFILE_FILE, PROFILE_ARRAYS, METADATA_FILE):
        if name in (PROFILE_FILE, PROFILE_ARRAYS) and not storage.exists(source.join(name)):
            continue
        storage.write_bytes_atomic(destination.join(name), storage.read_bytes(source.join(name)))


def run(config: JobConfig) -> TuneResult:
    """Search `config.tune.search_space`, then write the trials table, the metric plot,
    best_config.yaml and the best trial's artifact under output_dir; with tracking on
    (imgcls.tracking), in one MLflow run with each trial's run nested under it."""
    from imgcls.tracking.settings import check_registration, tracking_uri

    if config.tune is None:
        raise ConfigError("jobs/tune.py needs a `tune:` section with at least `tune.search_space` (see README).")
    check_search_space(config)
    check_registration(config.tracking, " The search registers nothing itself; training its best_config.yaml does.")
    storage.configure(config.storage)
    config = resolve_metric(config)
    output_dir = storage.resolve(config.output_dir, config.storage.endpoint_url)
    search_run = None
    if tracking_uri(config.tracking) is not None:  # MLflow is imported only then
        from imgcls.tracking.search_run import start_search_run

        search_run = start_search_run(config, output_dir)  # exit 2 when its server does not answer
    try:
        result = _search(config, output_dir, search_run)
    except BaseException as error:
        if search_run is not None:
            search_run.failed(killed=isinstance(error, KeyboardInterrupt))
        raise
    if search_run is not None:
        search_run.finished(result, config.tune.metric)
    return result


def _search(config: JobConfig, output_dir: storage.Location, search_run: SearchRun | None) -> TuneResult:
    """The search itself: the plan, the trials, and the outputs (`search_run`: the MLflow run or None)."""
    from imgcls.platform.ray_runtime import ensure_ray, free_resources
    from imgcls.reporting.plots import trial_curves

    settings = config.tune
    ensure_ray()
    plan = plan_tuning(config, free_resources()["CPU"])
    logger.info("tuning plan: %s", plan.describe(config.scaling.num_workers))

    trials_root = output_dir.join(TRIALS_FOLDER)
    storage.write_text_atomic(output_dir.join("tune_config.yaml"), config_to_yaml(config))
    parent = search_run.target if search_run is not None else None
    result_grid = _tuner(config, plan, output_dir, trials_root, parent).fit()
    trials, histories = summarise_trials(result_grid, config, trials_root)
    if search_run is not None:
        search_run.trials_ended(trials, trials_root)
    storage.write_text_atomic(output_dir.join("trials.csv"), trials_table_csv(trials, settings.metric))
    storage.write_bytes_atomic(output_dir.join("trials.png"), trial_curves(histories, settings.metric))
    for trial in trials:
        logger.info(
            "trial %s %s after %d epoch(s): %s %s (%s)",
            trial.trial_id, trial.status, trial.epochs, settings.metric,
            f"{trial.metric_last:.4f}" if trial.metric_last is not None else "-",
            ", ".join(f"{key}={value}" for key, value in trial.params.items()),
        )  # fmt: skip
    best = _best_trial(trials, settings.resolved_mode())
    _write_best_config(config, output_dir, trials_root, best, len(trials))
    artifact = output_dir.join("model")
    _copy_artifact(trials_root.join(best.trial_id, "model"), artifact)
    logger.info(
        "best trial %s: %s %.4f; best_config.yaml and its model written to %s",
        best.trial_id, settings.metric, best.metric_last, output_dir.uri,
    )  # fmt: skip
    return TuneResult(
        best_trial_id=best.trial_id,
        best_metric=best.metric_last,
        best_config_uri=output_dir.join("best_config.yaml").uri,
        artifact_uri=artifact.uri,
        trials=trials,
    )


def _tuner(config: JobConfig, plan: TuningPlan, output_dir: storage.Location, trials_root: storage.Location,
           search_run: TrackingTarget | None):  # fmt: skip
    """A new Tuner for the search, or the earlier one restored (finished trials kept) when the same
    output_dir already holds it; its trials' MLflow runs nested under `search_run` when tracked."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    settings = config.tune
    base_values = config.model_dump(mode="json")
    base_values["scaling"].update(cpus_per_worker=plan.cpus_per_worker, data_cpus=plan.data_cpus)
    base_dir = os.environ.get("IMGCLS_BASE_DIR") or os.getcwd()
    trainable = tune.with_parameters(
        run_trial, base_values=base_values, trials_uri=trials_root.uri, base_dir=base_dir, search_run=search_run
    )
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
    experiment = output_dir.join(EXPERIMENT_NAME)
    filesystem = None if output_dir.is_local else output_dir.filesystem
    if tune.Tuner.can_restore(experiment.path, storage_filesystem=filesystem):
        logger.info("found an earlier search in %s: resuming it (finished trials are kept)", experiment.uri)
        return tune.Tuner.restore(
            experiment.path, trainable=trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )  # fmt: skip
    scheduler = FIFOScheduler()
    if settings.asha:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            # One past the last epoch: ASHA stops a trial that reaches max_t at once, which would
            # kill it between its last report and writing its artifact.
            max_t=max_epochs(config) + 1,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=tune_search_space(settings),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.resolved_mode(),
            scheduler=scheduler,
            num_samples=settings.num_samples,
            # Tune ignores TuneConfig.max_concurrent_trials when a search algorithm is given.
            search_alg=tune.search.BasicVariantGenerator(random_state=config.seed, max_concurrent=plan.max_concurrent_trials),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=output_dir.path, storage_filesystem=filesystem, verbose=1),
    )


def _write_best_config(config: JobConfig, output_dir, trials_root, best: TrialSummary, num_trials: int) -> None:
    """best_config.yaml: the best trial's config, to train again with the run's own scaling."""
    import yaml

    settings = config.tune
    best_values = yaml.safe_load(storage.read_bytes(trials_root.join(best.trial_id, "config.yaml")))
    best_values["output_dir"] = f"{config.output_dir.rstrip('/')}/best"
    best_values["scaling"] = config.scaling.model_dump(mode="json")  # the trial's share was the tuner's plan
    best_values["tune"] = None
    best_values["tracking"] = {**best_values.get("tracking", {}), "register_as": config.tracking.register_as}
    best_config = build_model(JobConfig, best_values, "best trial config")
    storage.write_text_atomic(
        output_dir.join("best_config.yaml"),
        f"# Best of {num_trials} trials by {settings.metric} ({settings.resolved_mode()}): trial {best.trial_id}, "
        f"{settings.metric} {best.metric_last:.4f}.\n# Train it: python jobs/train.py --config "
        f"{output_dir.join('best_config.yaml').uri}\n" + config_to_yaml(best_config),
    )
