"""Whether a training run is tracked in MLflow and where, and what the driver hands rank 0's epoch
sink (`TrackingTarget`). Imports no MLflow: a run without tracking never loads it."""

from __future__ import annotations

import os

from pydantic import BaseModel

from imgcls.config import DEFAULT_EXPERIMENT, TrackingConfig
from imgcls.errors import ConfigError

# MLflow's own variable: a team's server, set once for every tool.
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


class TrackingTarget(BaseModel):
    """The MLflow run one training logs to (`WorkerPlan.tracking`)."""

    tracking_uri: str
    run_id: str


def tracking_uri(config: TrackingConfig) -> str | None:
    """`tracking.mlflow_uri`, else the environment's MLFLOW_TRACKING_URI; None: tracking is off."""
    return config.mlflow_uri or os.environ.get(TRACKING_URI_VARIABLE, "").strip() or None


def experiment_name(config: TrackingConfig) -> str:
    """`tracking.experiment` (load_job_config fills in the config file's name), else `imgcls`."""
    return config.experiment or DEFAULT_EXPERIMENT


def check_registration(config: TrackingConfig, note: str = "") -> None:
    """ConfigError (exit 2) for `tracking.register_as` without tracking: no registry to register in."""
    if config.register_as and tracking_uri(config) is None:
        raise ConfigError(
            f"tracking.register_as is {config.register_as}, but tracking is off: set tracking.mlflow_uri (or "
            f"{TRACKING_URI_VARIABLE}) to the MLflow server whose registry holds the model.{note}"
        )
