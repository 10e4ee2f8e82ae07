"""Building an artifact's reference profile from a trained Keras model and the images it was
validated on, with the same decoding and the same per-image observations as every bulk run."""

from __future__ import annotations

import logging
import time

import numpy as np

from imgcls.monitoring.observations import Observations, observe
from imgcls.monitoring.profile import (
    MAX_PROFILE_IMAGES,
    ProfileArrays,
    ReferenceProfile,
    build_profile,
    random_projection,
)  # fmt: skip

logger = logging.getLogger(__name__)


def profile_sample(paths: list[str], seed: int, limit: int = MAX_PROFILE_IMAGES) -> list[str]:
    """At most `limit` of `paths`, a seeded sample in listing order."""
    if len(paths) <= limit:
        return list(paths)
    chosen = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
    return [paths[index] for index in chosen]


def reference_profile(
    model,
    class_names: list[str],
    task: str,
    paths: list[str],
    decode_arguments: dict,
    source: str,
    batch_size: int = 64,
    threads: int = 2,
) -> tuple[ReferenceProfile, ProfileArrays | None] | None:
    """The profile of `model` on `paths` (decoded as `decode_batch` does with `decode_arguments`), or
    None when none of them is readable."""
    from imgcls.inference.in_process import decoded_on_threads
    from imgcls.inference.predictor import class_probabilities
    from imgcls.modeling.features import with_features

    started = time.perf_counter()
    features_model = with_features(model)
    projection = None if features_model is None else random_projection(int(features_model.outputs[0].shape[-1]))
    parts: list[Observations] = []
    for block in decoded_on_threads(paths, threads, decode_arguments):
        readable = np.asarray([error == "" for error in block["error"]], dtype=bool)
        if not readable.any():
            continue
        images = block["image"][readable]
        raw, embedding = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            if features_model is None:
                raw.append(model.predict_on_batch(batch))
            else:
                features, outputs = features_model.predict_on_batch(batch)
                raw.append(outputs)
                embedding.append(np.asarray(features, dtype=np.float32) @ projection)
        probabilities = class_probabilities(np.concatenate(raw), task)
        parts.append(observe(
            probabilities, images, block["original_width"][readable], block["original_height"][readable],
            task == "multilabel", np.concatenate(embedding) if embedding else None,
        ))  # fmt: skip
    if not parts:
        logger.warning("no readable image for the reference profile: the artifact goes without one")
        return None
    profile, arrays = build_profile(Observations.concatenate(parts), class_names, source, projection)
    logger.info("reference profile of %d %s images (%.1f s)", profile.images,
                "validation" if source == "validation" else "held-out training", time.perf_counter() - started)  # fmt: skip
    return profile, arrays
