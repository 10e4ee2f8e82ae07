"""The streaming pipeline that predict and evaluate share: decoded images in, the model's output out,
wherever the placement runs it."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from imgcls.config import EvaluateConfig, PredictConfig
from imgcls.inference.placement import ModelPlacement, choose_placement
from imgcls.inference.predictor import Output


def prediction_batches(
    config: PredictConfig | EvaluateConfig,
    metadata,
    paths: list[str],
    top_k: int,
    min_score: float | None = None,
    placement: ModelPlacement | None = None,
    output: Output = "rows",
) -> Iterator[pa.Table]:
    """Arrow tables, in input order per block: prediction rows (`output="rows"`, the Parquet schema) or
    each image's probability per class (`output="probabilities"`: path, probabilities, error). Decoding
    and the model run in this process or in Ray Data tasks and an actor pool (see `choose_placement`)."""
    from imgcls.inference.actor_pool import batches_from_pool, pool_dataset
    from imgcls.inference.in_process import batches_in_process

    placement = placement or choose_placement(len(paths), config)
    if placement.kind == "driver":
        return batches_in_process(config, metadata, paths, top_k, min_score, placement, output)
    return batches_from_pool(pool_dataset(config, metadata, paths, top_k, min_score, placement.reason, output))
