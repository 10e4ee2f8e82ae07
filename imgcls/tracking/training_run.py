"""What the training driver logs to MLflow. At the start: the server must answer (else exit 2), then
the run (found again for a resumed output_dir), its params once and its tags. At the end: the data's
counts, model_version, the outputs (artifacts, or links to a bucket's) and the run's status. Nothing
after the start may fail a training: the first failure is one warning, and tracking stops there.
`open_run` and `TrackedRun` are that start and that rule for any job's run (search_run uses them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from imgcls.config import JobConfig
from imgcls.errors import UserError, clip, redact
from imgcls.platform import storage
from imgcls.tracking.artifacts import log_outputs, set_tags
from imgcls.tracking.params import config_params
from imgcls.tracking.runs import experiment_id, find_or_create_run
from imgcls.tracking.server import check_server, create_client, unreachable_reason
from imgcls.tracking.settings import TrackingTarget, experiment_name, tracking_uri
from imgcls.tracking.tags import RUN_NAME_TAG, data_tags, start_tags

logger = logging.getLogger(__name__)

# MLflow takes at most this many params in one request.
PARAMS_PER_REQUEST = 100


class TrackedRun:
    """A job's MLflow run as its driver logs to it after the start: the first failure is one warning
    naming the server, and nothing more is tried, so tracking never changes the job's outcome."""

    job = "job"  # what the warning says is unaffected

    def __init__(self, client, tracking_uri: str, run_id: str, output_dir: storage.Location) -> None:
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.output_dir = output_dir
        self.broken = False  # set by the first failure: nothing more is tried

    def failed(self, killed: bool = False) -> None:
        """FAILED, or KILLED when a person interrupted it. A rerun into the same output_dir continues the run."""
        status = "KILLED" if killed else "FAILED"
        self._attempt(f"the run's {status} status", lambda: self.client.set_terminated(self.run_id, status))

    def _attempt(self, what: str, action: Callable[[], None]) -> None:
        if self.broken:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001 - whatever tracking hits, the job's outcome stands
            self.broken = True
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning(
                "MLflow tracking at %s stopped: %s not logged (%s); the %s itself is unaffected and its "
                "outputs are in %s", clip(self.tracking_uri), what, clip(reason, 300), self.job, self.output_dir.uri,
            )  # fmt: skip

    def _check_server(self) -> None:
        """Raise at once when the server no longer answers: a lost server costs seconds, not minutes of retries."""
        reason = unreachable_reason(self.tracking_uri)
        if reason is not None:
            raise ConnectionError(f"the server does not answer: {reason}")


class TrainingRun(TrackedRun):
    """One training's MLflow run, as the driver logs to it."""

    job = "training"

    @property
    def target(self) -> TrackingTarget:
        return TrackingTarget(tracking_uri=self.tracking_uri, run_id=self.run_id)

    def data_ready(self, data_summary: dict[str, Any]) -> None:
        self._attempt("the data's image counts", lambda: set_tags(self.client, self.run_id, data_tags(data_summary)))

    def finished(self, model_version: str) -> None:
        """model_version, the outputs, and FINISHED; a server that no longer answers costs seconds, not minutes."""

        def finish() -> None:
            self._check_server()
            set_tags(self.client, self.run_id, {"model_version": model_version})
            log_outputs(self.client, self.run_id, self.output_dir)
            self.client.set_terminated(self.run_id, "FINISHED")

        self._attempt("the end of the run (model_version, artifacts, FINISHED)", finish)

    def register(self, name: str, model_version: str) -> str | None:
        """The finished artifact as a new version of registered model `name`; its `models:/NAME/VERSION`,
        or None (said once) when tracking stopped before or the registry refused."""
        from imgcls.tracking.registry import register_artifact

        registered = []

        def register() -> None:
            version = register_artifact(self.client, name, self.run_id, self.output_dir, model_version)
            set_tags(self.client, self.run_id, {"imgcls.registered_as": version.reference})
            registered.append(version.reference)

        if self.broken:
            logger.warning("model %s is not registered as %s: MLflow tracking stopped earlier in this run; a rerun "
                           "into the same output_dir registers it", model_version, name)  # fmt: skip
            return None
        self._attempt(f"registering the model as {name}", register)
        if registered:
            logger.info("registered model %s as %s", model_version, registered[0])
        return registered[0] if registered else None


class OpenedRun(NamedTuple):
    """The run `open_run` found again or created, and the client that reaches it."""

    client: Any
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool


def open_run(config: JobConfig, output_dir: storage.Location, tags: dict[str, str], params: dict[str, str]) -> OpenedRun:
    """The job's run in MLflow (found again through output_dir's tracking.json, else created), its
    tags and new params logged; UserError (exit 2) naming the URI when the server does not answer or
    refuses. The run's name is `tags[RUN_NAME_TAG]` when given, else tracking.run_name."""
    uri = tracking_uri(config.tracking)
    check_server(uri)
    client = create_client(uri)
    from mlflow.exceptions import MlflowException

    name = experiment_name(config.tracking)
    try:
        experiment = experiment_id(client, name)
        run_name = tags.get(RUN_NAME_TAG, config.tracking.run_name)
        run_id, resumed = find_or_create_run(client, output_dir, experiment, run_name, tags, uri)
        if resumed:
            set_tags(client, run_id, tags)
        log_params(client, run_id, params)
    except MlflowException as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"The MLflow tracking server {clip(uri)} refused to start the run in experiment {clip(name)}: "
            f"{clip(message, 500)}. Fix tracking.mlflow_uri (or MLFLOW_TRACKING_URI) or the server's "
            "permissions; unset both to train without tracking."
        ) from None
    return OpenedRun(client, uri, experiment, run_id, resumed)


def start_training_run(config: JobConfig, output_dir: storage.Location,
                       extra_tags: dict[str, str] | None = None) -> TrainingRun:  # fmt: skip
    """The run of this training in MLflow, its params and tags (and `extra_tags`: a Tune trial's
    parent and name) logged; UserError (exit 2) naming the URI when the server does not answer or refuses."""
    tags = {**start_tags(config, output_dir), **(extra_tags or {})}
    opened = open_run(config, output_dir, tags, config_params(config.model_dump(mode="json")))
    logger.info(
        "tracking in MLflow at %s: experiment %s, %s run %s%s", clip(opened.tracking_uri),
        clip(experiment_name(config.tracking)), "resumed" if opened.resumed else "new", opened.run_id,
        run_link(opened.tracking_uri, opened.experiment_id, opened.run_id),
    )  # fmt: skip
    return TrainingRun(opened.client, opened.tracking_uri, opened.run_id, output_dir)


def run_link(uri: str, experiment: str, run_id: str) -> str:
    """` (UI-URL)` of the run on an HTTP server, empty otherwise."""
    if not uri.lower().startswith(("http://", "https://")):
        return ""
    return f" ({redact(uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Params the run does not have yet. MLflow refuses to change a logged param, so a resumed run
    keeps the values it started with, and says which differ now."""
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
    if changed:
        logger.info(
            "MLflow run %s keeps the params it started with; changed since: %s", run_id, clip(", ".join(changed), 500)
        )
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    for first in range(0, len(new), PARAMS_PER_REQUEST):
        client.log_batch(run_id, params=new[first : first + PARAMS_PER_REQUEST], synchronous=True)
