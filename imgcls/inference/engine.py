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
    thresholds: list[float] | None = None,
) -> Iterator[pa.Table]:
    """Arrow tables, in input order per block: prediction rows (`output="rows"`, the Parquet schema) or
    each image's probability per class (`output="probabilities"`: path, probabilities, error, the file's
    own original_width and original_height, and for evaluation its content_digest). Decoding
    and the model run in this process or in Ray Data tasks and an actor pool (see `choose_placement`).
    `thresholds` (multi-label models: one per class) decide each row's `labels`. A stream that delivers nothing for `config.stall_timeout_s` raises JobStalledError (see
    `imgcls.platform.stall_watch`)."""
    from imgcls.inference.actor_pool import batches_from_pool, pool_dataset
    from imgcls.inference.in_process import batches_in_process
    from imgcls.platform.stall_watch import StallWatch

    placement = placement or choose_placement(len(paths), config)
    if placement.kind == "driver":
        batches = batches_in_process(config, metadata, paths, top_k, min_score, placement, output, thresholds)
        watch = StallWatch(config.stall_timeout_s, "classifying in this process")
        return watch.watch(batches)
    from imgcls.platform import ray_runtime

    predictions, needs = pool_dataset(config, metadata, paths, top_k, min_score, placement.reason, output, thresholds)
    nodes_at_start = ray_runtime.live_node_ids()
    watch = StallWatch(
        config.stall_timeout_s, "from the model actor pool",
        describe=lambda: f"{needs}; {ray_runtime.cluster_state(nodes_at_start)}",
    )  # fmt: skip
    return watch.watch(batches_from_pool(predictions))
