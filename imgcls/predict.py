"""Bulk classification: a `Predictor` for Ray Data actor pools, and the job that writes Parquet."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from imgcls import errors, storage
from imgcls.config import EvaluateConfig, PredictConfig, pool_settings
from imgcls.errors import DataError, UserError

logger = logging.getLogger(__name__)

# Decode tasks beside a model actor pool ask for less than an actor's CPU: the differing resources
# also keep Ray Data from fusing decoding into the actors, so decoding runs in parallel tasks beside them.
DECODE_TASK_CPUS = 0.5

# Rows per decode task: big blocks for big inputs (fewer tasks, less scheduling and Ray overhead;
# 256 -> 1,024 rows took 20,000 images from 581 to 686 images/s on 2 cores), but at least about
# four blocks per decode slot for small inputs, so every core has work.
MIN_BLOCK_ROWS = 256
MAX_BLOCK_ROWS = 1024

UNKNOWN_LABEL = "unknown"

# Tens of MB of Parquet (the bench's rows take 24 bytes each): large enough for readers, small
# enough to retry a copy.
DEFAULT_ROWS_PER_FILE = 1_000_000

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("model_version", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def class_probabilities(raw_outputs: np.ndarray, task: str) -> np.ndarray:
    """The model's outputs as one probability per class (a sigmoid unit becomes [1 - p, p])."""
    raw_outputs = np.asarray(raw_outputs, dtype=np.float32)
    if task == "binary":
        positive = raw_outputs.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return raw_outputs


def _limit_tensorflow_threads(threads: int) -> None:
    """Keep TensorFlow to the CPUs the actor reserved: by default it spins up a thread per core of
    the node and competes with the decode tasks that Ray placed beside it."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran in this process (an in-process call): keep its pool.
        logger.debug("TensorFlow thread pools already initialised; not limiting them to %d", threads)


def block_rows(num_images: int, decode_slots: float) -> int:
    wanted = math.ceil(num_images / max(1.0, 4 * decode_slots))
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, wanted))


class Predictor:
    """Callable class for `Dataset.map_batches`: loads the artifact once per actor, then turns
    decoded batches (path, image, error) into prediction rows with the DESIGN.md schema."""

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        batch_size: int,
        endpoint_url: str | None = None,
        min_score: float | None = None,
        cpu_threads: int | None = None,
        lean_import: bool = False,
    ):
        from imgcls.tensorflow_import import import_for_inference

        import_for_inference(lean=lean_import)
        if cpu_threads is not None:
            _limit_tensorflow_threads(cpu_threads)
        from imgcls.artifact import load_artifact

        self.model, self.metadata = load_artifact(model_uri, endpoint_url)
        self.class_names = np.array(self.metadata.class_names, dtype=object)
        self.top_k = min(top_k, len(self.class_names))
        self.batch_size = batch_size
        self.min_score = min_score

    @classmethod
    def from_artifact(
        cls, model_uri: str, top_k: int = 5, batch_size: int = 64, endpoint_url: str | None = None
    ) -> "Predictor":
        return cls(model_uri, top_k, batch_size, endpoint_url)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        outputs = [
            self.model.predict_on_batch(images[start : start + self.batch_size].astype(np.float32))
            for start in range(0, len(images), self.batch_size)
        ]
        return class_probabilities(np.concatenate(outputs, axis=0), self.metadata.task)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(path) for path in batch["path"]]
        errors = [str(error) for error in batch["error"]]
        readable = np.array([error == "" for error in errors], dtype=bool)
        rows = len(paths)
        labels: list[str | None] = [None] * rows
        scores: list[float | None] = [None] * rows
        top_labels: list[list[str] | None] = [None] * rows
        top_scores: list[list[float] | None] = [None] * rows
        if readable.any():
            probabilities = self.probabilities(batch["image"][readable])
            ranking = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
            ranked_scores = np.take_along_axis(probabilities, ranking, axis=1)
            for position, row in enumerate(np.flatnonzero(readable)):
                top_labels[row] = self.class_names[ranking[position]].tolist()
                top_scores[row] = ranked_scores[position].tolist()
                scores[row] = float(ranked_scores[position, 0])
                below = self.min_score is not None and scores[row] < self.min_score
                labels[row] = UNKNOWN_LABEL if below else top_labels[row][0]
        return pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
                "score": pa.array(scores, pa.float32()),
                "top_k_labels": pa.array(top_labels, pa.list_(pa.string())),
                "top_k_scores": pa.array(top_scores, pa.list_(pa.float32())),
                "model_version": pa.array([self.metadata.model_version] * rows, pa.string()),
                "error": pa.array([error or None for error in errors], pa.string()),
            },
            schema=PREDICTION_SCHEMA,
        )


class PredictSummary(BaseModel):
    model_config = {"protected_namespaces": ()}

    run_id: str
    output_uri: str
    model_version: str
    images_listed: int
    already_done: int
    classified: int
    errored: int
    seconds: float
    images_per_second: float
    files: list[str]


def _count_rows(files: list[str], endpoint_url: str | None) -> tuple[int, int]:
    import pyarrow.parquet as pq

    rows = errored = 0
    for uri in files:
        location = storage.resolve(uri, endpoint_url)
        with location.filesystem.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["error"])
        rows += table.num_rows
        errored += table.num_rows - table.column("error").null_count
    return rows, errored


def run(config: PredictConfig) -> PredictSummary:
    """Classify every image under `config.input` not yet in `config.output` for this model version,
    and commit one Parquet row per image as one run (see `imgcls.output_runs`). The run holds the
    output's lease (`imgcls.output_lease`) from before it reads what is done until its commit."""
    from imgcls import output_runs
    from imgcls.artifact import read_metadata
    from imgcls.data import list_prediction_inputs
    from imgcls.output_lease import OutputLease

    started = time.perf_counter()
    endpoint_url = config.storage.endpoint_url
    metadata = read_metadata(config.model, endpoint_url)
    output = storage.resolve(config.output, endpoint_url)
    _check_input_and_output(config, output)
    listing = list_prediction_inputs(config.input, endpoint_url)
    if not listing.paths:
        raise DataError(f"No images found under {config.input} ({listing.ignored} non-image or hidden files ignored).")
    if not config.allow_foreign_files:
        output_runs.refuse_foreign_files(output, output_runs.survey(output))
    run_id = output_runs.new_run_id()
    with OutputLease(output, run_id, config.lock_ttl_s, config.lock_wait_s) as lease:
        return _run_holding_lease(config, metadata, listing, output, run_id, lease, started)


def _check_input_and_output(config: PredictConfig, output: storage.Location) -> None:
    """Input and output compared as the places they resolve to (symlinks followed): never the same,
    and with --overwrite neither inside the other."""
    input_location = storage.resolve(config.input, config.storage.endpoint_url)
    if input_location.is_local != output.is_local:
        return
    if output.is_local:
        inside = os.path.realpath(input_location.path), os.path.realpath(output.path)
    elif input_location.endpoint_url == output.endpoint_url:
        inside = input_location.path.rstrip("/"), output.path.rstrip("/")
    else:
        return
    input_path, output_path = inside
    if input_path == output_path:
        raise UserError(f"--output {config.output} is the input folder itself: predictions would mix with the images.")
    if config.overwrite and (input_path.startswith(output_path + "/") or output_path.startswith(input_path + "/")):
        raise UserError(
            f"--overwrite with --input {config.input} and --output {config.output}, one inside the other: "
            "use an output folder of its own."
        )


def _run_holding_lease(config: PredictConfig, metadata, listing, output, run_id: str, lease, started: float) -> PredictSummary:
    from imgcls import output_runs

    endpoint_url = config.storage.endpoint_url
    output_runs.discard_stale_staging(output)
    contents = output_runs.survey(output)
    superseded = 0
    if not config.overwrite:  # also repairs a run that committed but died before replacing older rows
        superseded = output_runs.supersede_older_rows(output, metadata.model_version, contents)
    done = set() if config.overwrite else output_runs.done_paths(output, metadata.model_version, contents)
    todo = [path for path in listing.paths if path not in done]
    placement = choose_placement(len(todo), config)
    record = {
        "run_id": run_id, "status": "running", "input": config.input, "output": output.uri,
        "model": config.model, "model_version": metadata.model_version, "overwrite": config.overwrite,
        "images_listed": len(listing.paths), "already_done": len(listing.paths) - len(todo),
        "duplicates_dropped": listing.duplicates,
        "model_placement": placement.kind, "placement_reason": placement.reason,
        "started": output_runs.now(),
    }  # fmt: skip
    output_runs.write_run_record(output, run_id, record)
    logger.info(
        "run %s: %d images listed under %s, %d already classified by model %s, %d to classify",
        run_id, len(listing.paths), config.input, record["already_done"], metadata.model_version, len(todo),
    )  # fmt: skip
    files: list[str] = []
    rows = errored = 0
    try:
        if todo:
            files = _classify(config, metadata, todo, output, run_id, placement, lease)
            rows, errored = _count_rows(files, endpoint_url)
            if rows != len(todo):
                raise RuntimeError(f"wrote {rows} prediction rows for {len(todo)} images")
        if config.overwrite:
            removed = output_runs.remove_other_runs(output, run_id)
            logger.info("--overwrite: removed %d earlier imgcls run(s)", removed)
        elif todo:
            superseded += output_runs.supersede_older_rows(output, metadata.model_version)
    except BaseException as error:
        record.update(status="failed", error=f"{type(error).__name__}: {error}", finished=output_runs.now())
        output_runs.write_run_record(output, run_id, record)
        raise
    seconds = time.perf_counter() - started
    summary = PredictSummary(
        run_id=run_id,
        output_uri=output.uri,
        model_version=metadata.model_version,
        images_listed=len(listing.paths),
        already_done=record["already_done"],
        classified=rows - errored,
        errored=errored,
        seconds=round(seconds, 3),
        images_per_second=round(rows / seconds, 1),
        files=[PurePosixPath(uri).name for uri in files],
    )
    record.update(
        status="succeeded", finished=output_runs.now(), classified=summary.classified, errored=errored,
        superseded_rows=superseded, seconds=summary.seconds, images_per_second=summary.images_per_second, files=files,
    )  # fmt: skip
    output_runs.write_run_record(output, run_id, record)
    logger.info(
        "done: %d images listed, %d already done, %d classified, %d errored, %.1f images/s, output %s",
        summary.images_listed, summary.already_done, summary.classified, summary.errored,
        summary.images_per_second, summary.output_uri,
    )  # fmt: skip
    return summary


class ModelPlacement(BaseModel):
    """Where one run classifies, and why (logged, and kept in the run record)."""

    kind: Literal["driver", "actor_pool"]
    reason: str
    # Decoding threads of a run in the driver (0: one per CPU of this machine), and the CPUs of a
    # joined Ray cluster held for them (0: none held).
    decode_threads: int = 0
    reserved_cpus: int = 0


def choose_placement(num_images: int, config: PredictConfig | EvaluateConfig) -> ModelPlacement:
    """Run in this process (decoding on threads, the model here) or in Ray Data decode tasks and a
    model actor pool. A pool pays a fixed start-up (a worker process, TensorFlow's import and the
    model load in it: 4-8 s on 2 cores) and moves every image between processes; it earns that back
    only where it reaches CPUs this process cannot: other nodes, or more cores than its decode
    threads use. On one 2-CPU machine the process ran 20,000 images as fast as the pool or faster
    (1,120-1,480 against 930-1,200 images/s) with flat memory. So with `placement: auto`: a pool
    when one is sized (use_gpu, num_actors, max_actors); small runs in this process without looking
    for Ray; larger ones in a pool only if the cluster has several nodes or this machine more than
    MAX_DECODE_THREADS CPUs. A run in this process on a joined cluster holds its CPUs through Ray."""
    from imgcls import ray_runtime

    if config.placement == "actor_pool":
        return ModelPlacement(kind="actor_pool", reason="placement actor_pool")
    if config.placement == "driver":
        return ModelPlacement(kind="driver", reason="placement driver")
    sized = pool_settings(config)
    if sized:
        return ModelPlacement(kind="actor_pool", reason=f"{' and '.join(sized)} set")
    if num_images < config.pool_min_images:
        return ModelPlacement(kind="driver", reason=f"fewer than pool_min_images={config.pool_min_images} images")
    if not ray_runtime.ray_in_use():
        cpus = _machine_cpus()
        if cpus > MAX_DECODE_THREADS:
            return ModelPlacement(kind="actor_pool", reason=f"this machine has {cpus} CPUs, more than {MAX_DECODE_THREADS} decode threads use")
        return ModelPlacement(kind="driver", reason=f"no Ray cluster in use; this machine has {cpus} CPUs")
    ray_runtime.ensure_ray()
    nodes, node_cpus = ray_runtime.cluster_shape()
    if nodes > 1:
        return ModelPlacement(kind="actor_pool", reason=f"the Ray cluster has {nodes} nodes")
    if node_cpus < 1:  # a driver outside the cluster's node (Ray Client), or a node without CPUs
        return ModelPlacement(kind="actor_pool", reason="this process is not on a Ray node with CPUs")
    if node_cpus > MAX_DECODE_THREADS:
        return ModelPlacement(kind="actor_pool", reason=f"this node has {node_cpus:g} CPUs, more than {MAX_DECODE_THREADS} decode threads use")
    free = math.floor(ray_runtime.free_resources()["CPU"] + 1e-6)
    if free < 1:
        return ModelPlacement(kind="actor_pool", reason="every CPU of the Ray cluster is held: the pool waits its turn")
    threads = min(free, MAX_DECODE_THREADS)
    return ModelPlacement(
        kind="driver", reason=f"the Ray cluster is this machine alone ({node_cpus:g} CPUs)",
        decode_threads=threads, reserved_cpus=threads,
    )  # fmt: skip


def prediction_batches(
    config: PredictConfig | EvaluateConfig,
    metadata,
    paths: list[str],
    top_k: int,
    min_score: float | None = None,
    placement: ModelPlacement | None = None,
) -> Iterator[pa.Table]:
    """The streaming pipeline shared by predict and evaluate, as Arrow tables of prediction rows:
    decoding in parallel Ray Data tasks, then the model in an actor pool sized by the resource plan,
    or all in this process (see `choose_placement`)."""
    placement = placement or choose_placement(len(paths), config)
    if placement.kind == "driver":
        return _batches_in_driver(config, metadata, paths, top_k, min_score, placement)
    return _batches_from_pool(_pool_dataset(config, metadata, paths, top_k, min_score, placement.reason))


def _batches_from_pool(predictions) -> Iterator[pa.Table]:
    import ray.exceptions

    try:
        yield from predictions.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        raise user_error from None


# How a traceback's last line names one of our errors, e.g. "imgcls.errors.UserError: No model.keras ...".
_ERROR_LINE = re.compile(rf"^{re.escape(errors.__name__)}\.(\w+): (.+)$", re.MULTILINE)


def user_error_in(error: BaseException) -> UserError | None:
    """The user's error inside a Ray error, if that is what it is. A model actor that fails to start
    (a broken artifact, a missing weights file) reaches the driver as an ActorDiedError that keeps
    only the text of the actor's traceback; recover the message, so the job exits 2 with one line
    instead of 1 with Ray's stack."""
    for name, message in reversed(_ERROR_LINE.findall(str(error))):
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, UserError):
            return kind(message)
    return None


def _predictor_arguments(config: PredictConfig | EvaluateConfig, top_k: int, min_score: float | None) -> dict:
    endpoint_url = config.storage.endpoint_url
    return {
        "model_uri": storage.resolve(config.model, endpoint_url).uri,
        "top_k": top_k,
        "batch_size": config.batch_size,
        "endpoint_url": endpoint_url,
        "min_score": min_score,
    }


# Images per decoded block in a run in this process: small enough that the model starts on the first
# block within a fraction of a second, large enough that per-block work (Arrow tables) stays small.
IN_PROCESS_BLOCK_ROWS = 256
# Decoding threads of a run in this process, and the most CPUs a machine may have for large runs to
# stay here. Part of each image's decode holds the GIL (reading the file, Pillow's header parsing):
# on 2 cores, 2 threads decoded 1.65-1.95x one thread, 2 processes 2.1x, so threads should stop
# gaining somewhere past 8; not measured beyond 2 cores.
MAX_DECODE_THREADS = 8


def _batches_in_driver(
    config: PredictConfig | EvaluateConfig,
    metadata,
    paths: list[str],
    top_k: int,
    min_score: float | None,
    placement: ModelPlacement,
) -> Iterator[pa.Table]:
    """A run entirely in this process: no Ray worker processes or actors to start (a second or two
    each on 2 cores) and no images to move between processes."""
    from tqdm import tqdm

    from imgcls.ray_runtime import reserved_cpus
    from imgcls.tensorflow_import import process_is_ours

    threads = placement.decode_threads or _decode_threads()
    logger.info(
        "classifying %d images in this process (%s): decoding on %d threads%s, no Ray tasks or actor pool",
        len(paths), placement.reason, threads,
        f", holding {placement.reserved_cpus} CPUs of the Ray cluster" if placement.reserved_cpus else "",
    )  # fmt: skip
    # TensorFlow's import and the model load run on their own thread while decoding starts; the first
    # decoded block waits for the model.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgcls-model-load")
    loading = loader.submit(Predictor, **_predictor_arguments(config, top_k, min_score), lean_import=process_is_ours())
    loader.shutdown(wait=False)
    # A bar on a terminal only (tqdm's default), as Ray Data's bar does for runs with a pool.
    with (
        reserved_cpus(placement.reserved_cpus),
        tqdm(total=len(paths), unit="img", desc="classifying", disable=None, mininterval=0.5) as progress,
    ):
        for block in decoded_on_threads(config, metadata, paths, threads):
            table = loading.result()(block)
            progress.update(table.num_rows)
            yield table


def _machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_threads() -> int:
    """One decoding thread per CPU this process may use, up to MAX_DECODE_THREADS: Pillow releases
    the GIL while it decodes and resizes (2 threads decoded 1,950 images/s on 2 cores, 1 thread 1,070)."""
    return max(1, min(MAX_DECODE_THREADS, _machine_cpus()))


def decoded_on_threads(
    config: PredictConfig | EvaluateConfig, metadata, paths: list[str], threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded blocks of `paths`, in order, with the columns of the Ray Data decode tasks (path,
    image, error). At most two blocks more than there are threads are decoded ahead, so memory stays flat."""
    from imgcls.data import decode_batch

    arguments = {
        "image_size": tuple(metadata.image_size), "channels": metadata.channels,
        "max_pixels": config.max_image_pixels, "endpoint_url": config.storage.endpoint_url,
        "max_bytes": config.max_image_bytes,
    }  # fmt: skip
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


def _pool_dataset(
    config: PredictConfig | EvaluateConfig, metadata, paths: list[str], top_k: int, min_score: float | None, reason: str
):
    """Prediction rows from the model in a Ray Data actor pool, as a lazy dataset."""
    import ray.data

    from imgcls.data import decoded_dataset
    from imgcls.ray_runtime import ensure_ray, free_resources
    from imgcls.resources import plan_prediction

    ensure_ray()
    totals = free_resources()
    plan = plan_prediction(config.num_actors, config.use_gpu, totals["CPU"], totals["GPU"], config.max_actors)
    logger.info(
        "classifying %d images with %s model actor(s) x %g CPU%s (%s); decoding in parallel tasks", len(paths),
        f"{plan.num_actors}-{plan.max_actors}" if plan.autoscaling else plan.num_actors,
        plan.cpus_per_actor, ", 1 GPU" if plan.gpus_per_actor else "", reason,
    )  # fmt: skip
    pool = (
        ray.data.ActorPoolStrategy(min_size=plan.num_actors, max_size=plan.max_actors)
        if plan.autoscaling
        else ray.data.ActorPoolStrategy(size=plan.num_actors)
    )
    decode_slots = (totals["CPU"] - plan.num_actors * plan.cpus_per_actor) / DECODE_TASK_CPUS
    rows_per_block = block_rows(len(paths), decode_slots)
    decoded = decoded_dataset(
        paths, None, tuple(metadata.image_size), metadata.channels, config.max_image_pixels,
        config.decode_batch_size, config.storage.endpoint_url, num_cpus=DECODE_TASK_CPUS, rows_per_block=rows_per_block,
        max_bytes=config.max_image_bytes,
    )  # fmt: skip
    # Ray Data's default reserves half the CPUs in equal shares per operator, which held decoding to
    # one task beside an actor that mostly waits (20,000 images: 574 images/s without, 467 with).
    decoded.context.op_resource_reservation_enabled = False
    return decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={
            **_predictor_arguments(config, top_k, min_score),
            "cpu_threads": None if plan.gpus_per_actor else max(1, round(plan.cpus_per_actor)),
            "lean_import": True,  # an actor's process is ours
        },
        # A whole decoded block per call (fewer Arrow conversions); the model still sees batch_size.
        batch_size=rows_per_block,
        batch_format="numpy",
        compute=pool,
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
    )


def _classify(
    config: PredictConfig, metadata, paths: list[str], output, run_id: str, placement: ModelPlacement, lease
) -> list[str]:
    """Run the streaming pipeline for `paths` into the run's staging folder, then commit it (only
    while this run still holds the output's lease)."""
    from imgcls import output_runs

    predictions = prediction_batches(
        config, metadata, paths, config.top_k or min(5, len(metadata.class_names)), config.min_score, placement
    )
    staging = output_runs.begin_staging(output, run_id, metadata.model_version)
    output_runs.write_staged_files(
        predictions,
        staging,
        PREDICTION_SCHEMA,
        config.rows_per_file or DEFAULT_ROWS_PER_FILE,
    )
    partition = None
    if config.partition_by == "run_date":
        partition = f"run_date={datetime.now(timezone.utc).strftime('%Y-%m-%d')}"
    lease.verify()
    return output_runs.commit(output, staging, run_id, partition)
