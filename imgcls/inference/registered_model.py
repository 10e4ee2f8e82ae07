"""A `--model models:/NAME@ALIAS` (or `/VERSION`) of predict and evaluate, resolved to the imgcls
artifact its registered version names. MLflow is loaded only for such a --model."""

from __future__ import annotations

from imgcls.config import EvaluateConfig, PredictConfig
from imgcls.config.model_reference import is_model_reference
from imgcls.errors import UserError


def registered_model(config: PredictConfig | EvaluateConfig):
    """`config` with a registered --model replaced by its artifact's URI, and the registered
    version (`imgcls.tracking.registry.RegisteredVersion`); `config` and None for an artifact URI."""
    if not is_model_reference(config.model):
        return config, None
    from imgcls.tracking.registry import resolve

    found = resolve(config.model, config.mlflow_uri)
    return config.model_copy(update={"model": found.artifact_uri}), found


def check_registered_version(registered, metadata) -> None:
    """The artifact must be the one its version was registered with: a bucket's output_dir trained
    again since then holds another model."""
    if registered.model_version is not None and registered.model_version != metadata.model_version:
        raise UserError(
            f"{registered.reference} (version {registered.version}) was registered as model {registered.model_version}, "
            f"but {registered.artifact_uri} now holds model {metadata.model_version}: it was trained again into the "
            "same output_dir. Register the new model and promote it, or train into a new output_dir."
        )
