"""A training's MLflow run: its experiment found or created, and the run found again when output_dir
names one (`output_dir/tracking.json`: a rerun after a driver kill, a restarted worker) or created."""

from __future__ import annotations

import json
import logging

from imgcls.errors import UserError, clip, redact
from imgcls.platform import storage

logger = logging.getLogger(__name__)

# The file in output_dir that names the run's MLflow run, written with the other outputs (local or bucket).
RUN_RECORD = "tracking.json"


def read_run_record(output_dir: storage.Location) -> dict | None:
    """output_dir's tracking.json ({run_id, experiment_id, experiment, tracking_uri}), None when absent."""
    record = output_dir.join(RUN_RECORD)
    if not storage.exists(record):
        return None
    try:
        values = json.loads(storage.read_bytes(record))
    except ValueError:
        logger.warning("%s is not JSON: the run's MLflow run is not found again; a new one is started", record.uri)
        return None
    return values if isinstance(values, dict) else None


def resolve_run_id(output_dir: storage.Location) -> str | None:
    """The MLflow run of the training that wrote `output_dir`, if it was tracked."""
    record = read_run_record(output_dir)
    run_id = record.get("run_id") if record else None
    return run_id if isinstance(run_id, str) and run_id else None


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing (a parallel job creating it too is fine)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"The MLflow experiment {clip(name)} was deleted: restore it (`mlflow experiments restore`) or name "
            "another with tracking.experiment."
        )
    return experiment.experiment_id


def find_or_create_run(client, output_dir: storage.Location, experiment: str, run_name: str | None,
                       tags: dict[str, str], tracking_uri: str) -> tuple[str, bool]:  # fmt: skip
    """The run named by output_dir's tracking.json when this server has it (set RUNNING again),
    else a new run recorded there. Returns (run id, whether it was found again)."""
    run_id = resolve_run_id(output_dir)
    run = _live_run(client, run_id) if run_id else None
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id, True
    if run_id:
        logger.info("the MLflow run %s named in %s is not on %s (or deleted): starting a new run", run_id,
                    output_dir.join(RUN_RECORD).uri, clip(tracking_uri))  # fmt: skip
    run = client.create_run(experiment, tags=tags, run_name=run_name)
    record = {"run_id": run.info.run_id, "experiment_id": experiment, "tracking_uri": redact(tracking_uri)}
    storage.write_text_atomic(output_dir.join(RUN_RECORD), json.dumps(record, indent=2))
    return run.info.run_id, False


def _live_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run
