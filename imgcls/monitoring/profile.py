"""The reference profile a trained artifact carries (`profile.json` and `profile.npz`): what the
validation images looked like to the model when it was trained, to compare every bulk run with."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from pydantic import BaseModel, ValidationError

from imgcls.errors import StorageError
from imgcls.monitoring.observations import IMAGE_STATISTICS, MODEL_STATISTICS, Observations
from imgcls.monitoring.summaries import Quantiles, ScalarReference, bin_counts, reference_edges
from imgcls.platform import storage

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
PROFILE_ARRAYS = "profile.npz"
# The penultimate features are projected on this many fixed random directions: enough to see a
# change of what the images look like, few enough that 32x32 covariances are estimable from a few
# hundred validation images.
PROJECTED_DIMENSIONS = 32
PROJECTION_SEED = 20260
# Validation images profiled at most (a seeded sample of larger splits): the profile's precision
# is bounded by its size, its cost is one more pass over them.
MAX_PROFILE_IMAGES = 5000


class ReferenceProfile(BaseModel):
    """profile.json. The arrays (projection, embedding mean and covariance) are in profile.npz."""

    format_version: int = 1
    created_at: str
    source: Literal["validation", "train_holdout"]
    images: int
    class_names: list[str]
    class_counts: list[int]
    scalars: dict[str, ScalarReference]
    embedding_dimensions: int | None = None
    feature_width: int | None = None


class ProfileArrays(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    projection: np.ndarray
    mean: np.ndarray
    covariance: np.ndarray


def random_projection(feature_width: int, dimensions: int = PROJECTED_DIMENSIONS) -> np.ndarray:
    """Fixed Gaussian directions (feature_width, dimensions), stored with the profile so that every
    run projects with exactly the same matrix."""
    generator = np.random.default_rng(PROJECTION_SEED)
    return (generator.standard_normal((feature_width, dimensions)) / np.sqrt(dimensions)).astype(np.float32)


def build_profile(
    observations: Observations, class_names: list[str], source: str, projection: np.ndarray | None
) -> tuple[ReferenceProfile, ProfileArrays | None]:
    scalars = {}
    for name in (*MODEL_STATISTICS, *IMAGE_STATISTICS):
        values = observations.scalars[name]
        edges = reference_edges(values)
        scalars[name] = ScalarReference(edges=edges, counts=bin_counts(values, edges).tolist(), quantiles=Quantiles.of(values))
    arrays = None
    if projection is not None and observations.embedding is not None and observations.count > 1:
        arrays = ProfileArrays(
            projection=projection,
            mean=observations.embedding.mean(axis=0),
            covariance=np.cov(observations.embedding, rowvar=False),
        )
    profile = ReferenceProfile(
        created_at=datetime.now(timezone.utc).isoformat(),
        source=source,
        images=observations.count,
        class_names=class_names,
        class_counts=np.bincount(observations.top_class, minlength=len(class_names)).tolist(),
        scalars=scalars,
        embedding_dimensions=None if arrays is None else int(projection.shape[1]),
        feature_width=None if arrays is None else int(projection.shape[0]),
    )
    return profile, arrays


def profile_files(profile: ReferenceProfile, arrays: ProfileArrays | None) -> dict[str, bytes]:
    """The files to write into the artifact folder (before its metadata.json)."""
    files = {PROFILE_FILE: profile.model_dump_json(indent=2).encode()}
    if arrays is not None:
        buffer = io.BytesIO()
        np.savez(buffer, projection=arrays.projection, mean=arrays.mean, covariance=arrays.covariance)
        files[PROFILE_ARRAYS] = buffer.getvalue()
    return files


def read_profile(artifact_uri: str, endpoint_url: str | None = None) -> tuple[ReferenceProfile, ProfileArrays | None] | None:
    """The artifact's profile, or None when it has none (an artifact trained before profiles) or the
    profile is unreadable (said once in the log: the run predicts all the same, without a reference)."""
    location = storage.resolve(artifact_uri, endpoint_url)
    profile_location = location.join(PROFILE_FILE)
    if not storage.exists(profile_location):
        return None
    try:
        profile = ReferenceProfile.model_validate(json.loads(storage.read_bytes(profile_location)))
        arrays = None
        if profile.embedding_dimensions is not None:
            with np.load(io.BytesIO(storage.read_bytes(location.join(PROFILE_ARRAYS))), allow_pickle=False) as loaded:
                arrays = ProfileArrays(projection=loaded["projection"], mean=loaded["mean"], covariance=loaded["covariance"])
            if arrays.projection.shape != (profile.feature_width, profile.embedding_dimensions):
                raise ValueError(f"projection of shape {arrays.projection.shape} does not fit profile.json")
    except (ValueError, KeyError, OSError, StorageError, ValidationError) as error:
        logger.warning("the artifact's reference profile %s is unreadable (%s): monitoring without a reference",
                       profile_location.uri, str(error).splitlines()[0][:200])  # fmt: skip
        return None
    return profile, arrays
