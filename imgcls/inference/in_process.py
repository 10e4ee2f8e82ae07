"""A run entirely in the job's process: decoding on threads, the model here. No Ray worker processes
or actors to start and no images to move between processes."""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from imgcls.config import EvaluateConfig, PredictConfig
from imgcls.inference.placement import ModelPlacement, decode_threads
from imgcls.inference.predictor import Output, Predictor, decode_arguments, predictor_arguments

logger = logging.getLogger(__name__)

# Images per decoded block in a run in this process: small enough that the model starts on the first
# block within a fraction of a second, large enough that per-block work (Arrow tables) stays small.
IN_PROCESS_BLOCK_ROWS = 256


def batches_in_process(
    config: PredictConfig | EvaluateConfig,
    metadata,
    paths: list[str],
    top_k: int,
    min_score: float | None,
    placement: ModelPlacement,
    output: Output = "rows",
    thresholds: list[float] | None = None,
) -> Iterator[pa.Table]:
    """A run entirely in this process: no Ray worker processes or actors to start and no images to
    move between processes."""
    from tqdm import tqdm

    from imgcls.platform.ray_runtime import reserved_cpus
    from imgcls.platform.tensorflow_import import process_is_ours

    threads = placement.decode_threads or decode_threads()
    logger.info(
        "classifying %d images in this process (%s): decoding on %d threads%s, no Ray tasks or actor pool",
        len(paths), placement.reason, threads,
        f", holding {placement.reserved_cpus} CPUs of the Ray cluster" if placement.reserved_cpus else "",
    )  # fmt: skip
    # TensorFlow's import and the model load run on their own thread while decoding starts; the first
    # decoded block waits for the model.
    # A bar on a terminal only, as Ray Data's bar does for runs with a pool: decided now, since the
    # model's loading holds stderr for a moment (TensorFlow's start-up chatter is filtered out of it).
    on_terminal = sys.stderr.isatty()
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgcls-model-load")
    loading = loader.submit(
        Predictor, **predictor_arguments(config, top_k, min_score, output, thresholds), lean_import=process_is_ours()
    )
    loader.shutdown(wait=False)
    with (
        reserved_cpus(placement.reserved_cpus),
        tqdm(total=len(paths), unit="img", desc="classifying", disable=not on_terminal, mininterval=0.5) as progress,
    ):
        for block in decoded_on_threads(paths, threads, decode_arguments(config, metadata)):
            table = loading.result()(block)
            progress.update(table.num_rows)
            yield table


def decoded_on_threads(paths: list[str], threads: int, arguments: dict) -> Iterator[dict[str, np.ndarray]]:
    """Decoded blocks of `paths`, in order, with the columns of the Ray Data decode tasks (path,
    image, error, original sizes); `arguments` are `decode_batch`'s (see `decode_arguments`). At most
    two blocks more than there are threads are decoded ahead, so memory stays flat."""
    from imgcls.data.reading import decode_batch

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgcls-decode") as pool:
        try:
            for start in range(0, len(paths), IN_PROCESS_BLOCK_ROWS):
                block = {"path": np.array(paths[start : start + IN_PROCESS_BLOCK_ROWS], dtype=object)}
                pending.append(pool.submit(decode_batch, block, **arguments))
                if len(pending) > threads + 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (a failure, a closed generator): drop the blocks not started yet
            for future in pending:
                future.cancel()
