"""The `tracking:` section of a training config: where a run is tracked in MLflow (README, Experiment
tracking with MLflow). Imports no TensorFlow, Ray or MLflow."""

from __future__ import annotations

from pydantic import Field, field_validator

from imgcls.config.common import StrictModel, refuse_credentials_in_url
from imgcls.config.model_reference import check_model_name

# Experiment of a run whose config came from no file (only --set overrides).
DEFAULT_EXPERIMENT = "imgcls"


# MLflow's longest experiment name (and a run name shown in one table cell).
MAX_EXPERIMENT_NAME_CHARACTERS = 500


class TrackingConfig(StrictModel):
    """Off unless a tracking URI is set here or in the environment's MLFLOW_TRACKING_URI."""

    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking server the run logs to, e.g. http://mlflow:5000. Unset: the environment's "
        "MLFLOW_TRACKING_URI; neither: no tracking. Credentials never go here: MLflow reads them from "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_EXPERIMENT_NAME_CHARACTERS,
        description="MLflow experiment of the run, created when missing. Unset: the config file's name without "
        f"its extension (`digits` for examples/configs/digits.yaml), `{DEFAULT_EXPERIMENT}` without a file.",
    )
    run_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_EXPERIMENT_NAME_CHARACTERS,
        description="Name of the MLflow run. Unset: one MLflow makes up. A resumed run keeps the name it started with.",
    )

    register_as: str | None = Field(
        default=None,
        description="Register the finished artifact as a new version of this MLflow registered model (created when "
        "missing), for `predict --model models:/NAME@ALIAS` and `imgcls promote`. Needs tracking on. Unset: not "
        "registered.",
    )

    @field_validator("register_as")
    @classmethod
    def _usable_model_name(cls, value: str | None) -> str | None:
        return check_model_name(value) if value is not None else None

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials_in_uri(cls, value: str | None) -> str | None:
        return check_tracking_uri(value)


def check_tracking_uri(value: str | None) -> str | None:
    """A tracking URI without credentials (None for empty). The resolved config is saved in output_dir
    and logged as params: a password in the URI would be too."""
    refuse_credentials_in_url(value, "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    return value or None
