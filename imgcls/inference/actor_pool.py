"""A run on a Ray cluster: decoding in parallel Ray Data tasks, the model in a pool of actors sized
by the resource plan."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pyarrow as pa

from imgcls.config import EvaluateConfig, PredictConfig
from imgcls.errors import user_error_in
from imgcls.inference.predictor import Output, Predictor, decode_arguments, predictor_arguments

logger = logging.getLogger(__name__)

# Decode tasks beside a model actor pool ask for less than an actor's CPU: the differing resources
# also keep Ray Data from fusing decoding into the actors, so decoding runs in parallel tasks beside them.
DECODE_TASK_CPUS = 0.5


# Rows per decode task: big blocks for big inputs (fewer tasks, less scheduling and Ray overhead),
# but at least about four blocks per decode slot for small inputs, so every core has work.
MIN_BLOCK_ROWS = 256
MAX_BLOCK_ROWS = 1024


def block_rows(num_images: int, decode_slots: float) -> int:
    wanted = math.ceil(num_images / max(1.0, 4 * decode_slots))
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, wanted))


def pool_dataset(
    config: PredictConfig | EvaluateConfig,
    metadata,
    paths: list[str],
    top_k: int,
    min_score: float | None,
    reason: str,
    output: Output = "rows",
    thresholds: list[float] | None = None,
) -> tuple[object, str]:
    """The Predictor's output from a Ray Data actor pool, as a lazy dataset, and what the pool needs
    (for the message of a run that stalls)."""
    import ray.data

    from imgcls.data.datasets import decoded_dataset
    from imgcls.platform.ray_runtime import ensure_ray, free_resources
    from imgcls.platform.resources import plan_prediction

    ensure_ray()
    totals = free_resources()
    plan = plan_prediction(config.num_actors, config.use_gpu, totals["CPU"], totals["GPU"], config.max_actors)
    logger.info(
        "classifying %d images with %s model actor(s) x %g CPU%s (%s); decoding in parallel tasks", len(paths),
        f"{plan.num_actors}-{plan.max_actors}" if plan.autoscaling else plan.num_actors,
        plan.cpus_per_actor, ", 1 GPU" if plan.gpus_per_actor else "", reason,
    )  # fmt: skip
    # Elastic: the pool starts at its planned size but may run on a single actor, so that a node lost
    # with its actors slows the run instead of stopping it.
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors, initial_size=plan.num_actors)
    decode_slots = (totals["CPU"] - plan.num_actors * plan.cpus_per_actor) / DECODE_TASK_CPUS
    rows_per_block = block_rows(len(paths), decode_slots)
    decoded = decoded_dataset(
        paths, None, decode_batch_size=config.decode_batch_size, num_cpus=DECODE_TASK_CPUS,
        rows_per_block=rows_per_block, **decode_arguments(config, metadata),
    )  # fmt: skip
    # Ray Data's default reserves half the CPUs in equal shares per operator, which held decoding to
    # one task beside an actor that mostly waits.
    decoded.context.op_resource_reservation_enabled = False
    custom = "".join(f" + {amount:g} {name}" for name, amount in sorted(config.actor_resources.items()))
    needs = (
        f"the model actor pool needs at least 1 actor x {plan.cpus_per_actor:g} CPU{' + 1 GPU' if plan.gpus_per_actor else ''}"
        f"{custom} and decode tasks {DECODE_TASK_CPUS:g} CPU each"
    )
    predictions = decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={
            **predictor_arguments(config, top_k, min_score, output, thresholds),
            "cpu_threads": None if plan.gpus_per_actor else max(1, round(plan.cpus_per_actor)),
            "lean_import": True,  # an actor's process is ours
        },
        # A whole decoded block per call (fewer Arrow conversions); the model still sees batch_size.
        batch_size=rows_per_block,
        batch_format="numpy",
        compute=pool,
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
        resources=config.actor_resources or None,
    )
    return predictions, needs


def batches_from_pool(predictions) -> Iterator[pa.Table]:
    """The pool's tables; a user error raised inside an actor (a broken artifact) comes out as itself."""
    import ray.exceptions

    try:
        yield from predictions.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        raise user_error from None
