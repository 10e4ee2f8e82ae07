"""The MLflow model registry: a finished training's artifact registered as a new version of a named
model (`tracking.register_as`), an alias moved to a version (`imgcls promote`), and a `models:/`
reference resolved to an imgcls artifact that predict and evaluate read (`--model models:/NAME@ALIAS`).

A version's source is where its artifact lives: the bucket URI when the training wrote to a bucket
(imgcls reads it there, from every node), else the copy in the run's MLflow artifacts (`runs:/ID/model`),
which a job downloads once into its cache (README, Model registry)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from imgcls.config.model_reference import ModelReference, parse_model_reference
from imgcls.errors import UserError, clip
from imgcls.platform import storage
from imgcls.tracking.artifacts import MODEL_FOLDER
from imgcls.tracking.server import check_server, create_client
from imgcls.tracking.settings import TRACKING_URI_VARIABLE
from imgcls.tracking.tags import credential_free

logger = logging.getLogger(__name__)

# Model version tags: the imgcls model_version of the artifact, and where training wrote it.
MODEL_VERSION_TAG = "model_version"
ARTIFACT_URI_TAG = "imgcls.artifact_uri"

# Below this folder of the cache, one folder per server, model and version (a version never changes).
CACHE_FOLDER = "registry"


class RegisteredVersion(BaseModel):
    """One registered model version, and the imgcls artifact it resolves to."""

    model_config = {"protected_namespaces": ()}

    name: str
    version: str
    alias: str | None = None
    source: str
    model_version: str | None = None
    artifact_uri: str | None = None

    @property
    def reference(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def register_artifact(client, name: str, run_id: str, output_dir: storage.Location, model_version: str) -> RegisteredVersion:
    """Artifact `output_dir/model` of run `run_id` as a new version of registered model `name`
    (created when missing). A rerun of a finished training gets the version it registered before."""
    from mlflow.exceptions import MlflowException

    for existing in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if existing.tags.get(MODEL_VERSION_TAG) == model_version:
            return _version(existing)
    try:
        client.create_registered_model(name, description="Image classifier trained by imgcls.")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    artifact = output_dir.join(MODEL_FOLDER)
    source = f"runs:/{run_id}/{MODEL_FOLDER}" if output_dir.is_local else artifact.uri
    tags = credential_free({MODEL_VERSION_TAG: model_version, ARTIFACT_URI_TAG: artifact.uri})
    _quiet_registry_waits()
    created = client.create_model_version(
        name, source, run_id=run_id, tags=tags, description=f"imgcls model {model_version}, written to {artifact.uri}"
    )
    return _version(created)


def promote(name: str, version: str, alias: str, uri: str) -> tuple[RegisteredVersion, str | None]:
    """Point `alias` of registered model `name` at `version`; returns the version and the one the
    alias named before (None when it is new)."""
    from mlflow.exceptions import MlflowException

    client = _registry_client(uri)
    target = _get(client, ModelReference(name=name, version=version), uri)
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise UserError(f"The MLflow registry at {clip(uri)} refused to set alias {alias}: {_first_line(error)}") from None
    return target.model_copy(update={"alias": alias}), previous


def resolve(reference_text: str, mlflow_uri: str | None) -> RegisteredVersion:
    """The registered version `reference_text` names, with `artifact_uri` an imgcls artifact this
    process can read: the bucket it was trained into, or its MLflow copy downloaded into the cache."""
    uri = registry_uri(mlflow_uri, f"--model {clip(reference_text, 200)} names a registered model")
    reference = parse_model_reference(reference_text)
    client = _registry_client(uri)
    found = _get(client, reference, uri)
    if found.source.lower().startswith("s3://"):
        return found.model_copy(update={"artifact_uri": found.source})
    local = _cached_download(found, uri)
    logger.info("%s is version %s of %s (model %s), read from %s", reference.uri, found.version, found.name,
                found.model_version or "?", local)  # fmt: skip
    return found.model_copy(update={"artifact_uri": str(local)})


def registry_uri(mlflow_uri: str | None, needed_by: str, how_to_set: str = "--set mlflow_uri=http://HOST:5000") -> str:
    """`mlflow_uri`, else MLFLOW_TRACKING_URI; a UserError naming what needed it when neither is set."""
    uri = mlflow_uri or os.environ.get(TRACKING_URI_VARIABLE, "").strip()
    if not uri:
        raise UserError(f"{needed_by}, but no MLflow server is set: {how_to_set} or export {TRACKING_URI_VARIABLE}.")
    return uri


def _registry_client(uri: str):
    check_server(uri)  # exit 2 naming the URI when it does not answer
    return create_client(uri)


def _get(client, reference: ModelReference, uri: str) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException

    try:
        if reference.alias:
            found = client.get_model_version_by_alias(reference.name, reference.alias)
        else:
            found = client.get_model_version(reference.name, reference.version)
    except MlflowException as error:
        raise UserError(
            f"{reference.uri} is not in the MLflow registry at {clip(uri)}: {_first_line(error)}. "
            "`imgcls promote NAME VERSION --alias ALIAS` points an alias at a version."
        ) from None
    return _version(found).model_copy(update={"alias": reference.alias})


def _cached_download(found: RegisteredVersion, uri: str) -> Path:
    """The version's artifact in this machine's cache, downloaded the first time (to a temporary
    folder renamed into place, so a killed download is never taken for an artifact)."""
    import mlflow.artifacts

    folder = cache_root() / CACHE_FOLDER / _server_folder(uri) / found.name / found.version
    artifact = folder / MODEL_FOLDER
    if _cached_model_version(artifact) == found.model_version and found.model_version is not None:
        return artifact
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    download = Path(tempfile.mkdtemp(prefix=f".{found.version}-", dir=folder.parent))
    try:
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(download), tracking_uri=uri))
        if not (fetched / "metadata.json").is_file():
            raise UserError(
                f"Version {found.version} of {found.name} ({clip(found.source)}) holds no imgcls artifact (no "
                "metadata.json): register models with tracking.register_as."
            )
        if artifact.exists():
            shutil.rmtree(artifact)  # a stale copy this cache put there itself (its model_version differs)
        folder.mkdir(exist_ok=True)
        os.replace(fetched, artifact)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a download that fails is the user's server or network
        raise UserError(
            f"Could not download version {found.version} of {found.name} from {clip(found.source)} "
            f"({clip(uri)}): {_first_line(error)}"
        ) from None
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return artifact


def cache_root() -> Path:
    """IMGCLS_CACHE_DIR, else $XDG_CACHE_HOME/imgcls, else ~/.cache/imgcls."""
    explicit = os.environ.get("IMGCLS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgcls"


def _server_folder(uri: str) -> str:
    """A folder name per server: two servers' version 1 of `digits` are different models."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    name = f"{parts.hostname or parts.scheme}_{parts.port or ''}{parts.path}".strip("_/")
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in name) or "server"


def _cached_model_version(artifact: Path) -> str | None:
    import json

    try:
        return json.loads((artifact / "metadata.json").read_text()).get("model_version")
    except (OSError, ValueError, AttributeError):
        return None


def _version(model_version) -> RegisteredVersion:
    return RegisteredVersion(
        name=model_version.name, version=str(model_version.version), source=model_version.source,
        model_version=(model_version.tags or {}).get(MODEL_VERSION_TAG),
    )  # fmt: skip


def _quiet_registry_waits() -> None:
    # MLflow logs an INFO line while it waits for a new version to be READY (instant on a local store).
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return clip(text.splitlines()[0] if text else type(error).__name__, 300)

