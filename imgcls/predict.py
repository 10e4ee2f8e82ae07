"""The bulk classification job: list the input, skip what is done, classify the rest (see
`imgcls.inference`), and commit one Parquet row per image as one run (see `imgcls.platform.output_runs`)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone

from pydantic import BaseModel

from imgcls.config import PredictConfig
from imgcls.errors import DataError, UserError
from imgcls.inference.engine import prediction_batches
from imgcls.inference.placement import ModelPlacement, choose_placement
from imgcls.inference.predictor import PREDICTION_SCHEMA
from imgcls.inference.registered_model import check_registered_version, registered_model
from imgcls.inference.thresholds import resolve_thresholds, thresholds_by_class
from imgcls.platform import output_runs, storage
from imgcls.platform.output_runs import ChunkRecord, RunRecord
from imgcls.platform.chunks import ChunkedTables
from imgcls.monitoring.summaries import DriftReport, ReviewRecord

logger = logging.getLogger(__name__)

# Tens of MB of Parquet (the bench's rows take 24 bytes each): large enough for readers, small
# enough to retry a copy.
DEFAULT_ROWS_PER_FILE = 1_000_000


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
    drift: DriftReport | None = None
    review_file: str | None = None


def _count_rows(files: list[str], endpoint_url: str | None) -> tuple[int, int]:
    import pyarrow.parquet as pq

    rows = errored = 0
    for uri in files:
        location = storage.resolve(uri, endpoint_url)
        with storage.user_facing_errors(location, "read back"), location.filesystem.open_input_file(location.path) as handle:
            table = pq.read_table(handle, columns=["error"])
        rows += table.num_rows
        errored += table.num_rows - table.column("error").null_count
    return rows, errored


def run(config: PredictConfig) -> PredictSummary:
    """Classify every image under `config.input` not yet in `config.output` for this model version,
    and commit one Parquet row per image as one run (see `imgcls.output_runs`). The run holds the
    output's lease (`imgcls.output_lease`) from before it reads what is done until its commit."""
    from imgcls.data.listing import list_prediction_inputs
    from imgcls.modeling.artifact import read_metadata
    from imgcls.platform.output_lease import OutputLease

    started = time.perf_counter()
    storage.configure(config.storage)
    config, registered = registered_model(config)
    endpoint_url = config.storage.endpoint_url
    metadata = read_metadata(config.model, endpoint_url)
    if registered is not None:
        check_registered_version(registered, metadata)
    thresholds = resolve_thresholds(metadata, config.thresholds, config.min_score)  # bad overrides: exit 2 now
    output = storage.resolve(config.output, endpoint_url)
    _check_input_and_output(config, output)
    listing = list_prediction_inputs(config.input, endpoint_url)
    if not listing.paths:
        raise DataError(f"No images found under {config.input} ({listing.ignored} non-image or hidden files ignored).")
    if not config.allow_foreign_files:
        output_runs.refuse_foreign_files(output, output_runs.survey(output))
    run_id = output_runs.new_run_id()
    with OutputLease(output, run_id, config.lock_ttl_s, config.lock_wait_s) as lease:
        return _run_holding_lease(config, metadata, thresholds, listing, output, run_id, lease, started, registered)


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


def _run_holding_lease(
    config: PredictConfig, metadata, thresholds, listing, output, run_id: str, lease, started: float, registered=None
) -> PredictSummary:
    output_runs.discard_stale_staging(output)
    contents = output_runs.survey(output)
    # Parts written before a column existed get it (null), so that a reader of the whole output,
    # whose schema comes from the first file, never drops it silently.
    output_runs.add_missing_columns(output, PREDICTION_SCHEMA, contents)
    superseded = 0
    if not config.overwrite:  # also repairs a run that committed but died before replacing older rows
        superseded = output_runs.supersede_older_rows(output, metadata.model_version, contents)
    done = set() if config.overwrite else output_runs.done_paths(output, metadata.model_version, contents)
    todo = [path for path in listing.paths if path not in done]
    placement = choose_placement(len(todo), config)
    monitor = _run_monitor(config, metadata)
    run = RunBook(output, RunRecord(
        run_id=run_id, status="running", input=config.input, output=output.uri, model=config.model,
        model_version=metadata.model_version, overwrite=config.overwrite, images_listed=len(listing.paths),
        already_done=len(listing.paths) - len(todo), duplicates_dropped=listing.duplicates,
        model_placement=placement.kind, placement_reason=placement.reason, started=output_runs.now(),
        thresholds=thresholds_by_class(metadata.class_names, thresholds),
        registered_model=registered.model_dump(include={"name", "version", "alias", "source"}) if registered else None,
    ))  # fmt: skip
    logger.info(
        "run %s: %d images listed under %s, %d already classified by model %s, %d to classify",
        run_id, len(listing.paths), config.input, run.record.already_done, metadata.model_version, len(todo),
    )  # fmt: skip
    if thresholds is not None:
        logger.info("multi-label thresholds: %s", ", ".join(f"{name} {value:g}" for name, value in run.record.thresholds.items()))
    rows = errored = 0
    try:
        if todo:
            _classify(config, metadata, thresholds, todo, output, run, placement, lease, monitor)
            rows, errored = _count_rows(run.record.files, config.storage.endpoint_url)
            if rows != len(todo):
                raise RuntimeError(f"wrote {rows} prediction rows for {len(todo)} images")
        if config.overwrite:
            removed = output_runs.remove_other_runs(output, run_id)
            logger.info("--overwrite: removed %d earlier imgcls run(s)", removed)
        elif todo:
            superseded += output_runs.supersede_older_rows(output, metadata.model_version)
        drift = monitor.drift()
        review = _write_review(config, output, run_id, monitor, lease)
    except BaseException as error:
        output_runs.discard_own_staging(output, run_id)
        run.update(status="failed", error=f"{type(error).__name__}: {error}", finished=output_runs.now())
        raise
    seconds = time.perf_counter() - started
    summary = PredictSummary(
        run_id=run_id,
        output_uri=output.uri,
        model_version=metadata.model_version,
        images_listed=len(listing.paths),
        already_done=run.record.already_done,
        classified=rows - errored,
        errored=errored,
        seconds=round(seconds, 3),
        images_per_second=round(rows / seconds, 1),
        files=[uri[len(output.uri) :].lstrip("/") for uri in run.record.files],
        drift=drift,
        review_file=review.file if review else None,
    )
    monitoring = monitor.monitoring()
    run.update(
        status="succeeded", finished=output_runs.now(), classified=summary.classified, errored=errored,
        superseded_rows=superseded, seconds=summary.seconds, images_per_second=summary.images_per_second,
        monitoring=monitoring, drift=drift, review=review,
    )  # fmt: skip
    _log_monitoring(monitoring, drift)
    logger.info(
        "done: %d images listed, %d already done, %d classified, %d errored, %.1f images/s, output %s",
        summary.images_listed, summary.already_done, summary.classified, summary.errored,
        summary.images_per_second, summary.output_uri,
    )  # fmt: skip
    return summary


class RunBook:
    """The run's record as the run goes: written when the run starts and after every change."""

    def __init__(self, output: storage.Location, record: RunRecord) -> None:
        self.output = output
        self.record = record
        output_runs.write_run_record(output, record)

    def update(self, **changes) -> None:
        self.record = self.record.model_copy(update=changes)
        output_runs.write_run_record(self.output, self.record)


def _classify(
    config: PredictConfig,
    metadata,
    thresholds: list[float] | None,
    paths: list[str],
    output,
    run: RunBook,
    placement: ModelPlacement,
    lease,
    monitor,
) -> None:
    """Run the streaming pipeline for `paths` and commit its rows chunk by chunk (each only while this
    run still holds the output's lease), adding each chunk to the run record as it is committed. The
    monitor observes every row on the way (and takes its monitoring columns off)."""
    top_k = config.top_k or min(5, len(metadata.class_names))
    predictions = monitor.watch(
        prediction_batches(config, metadata, paths, top_k, config.min_score, placement, thresholds=thresholds)
    )
    partition = None
    if config.partition_by == "run_date":
        partition = f"run_date={datetime.now(timezone.utc).strftime('%Y-%m-%d')}"
    staging = output_runs.begin_staging(output, run.record.run_id, metadata.model_version)
    # With overwrite every image is classified again anyway: one chunk, so that readers never see old
    # and new rows of the same images side by side.
    chunks = ChunkedTables(
        predictions,
        max_rows=len(paths) if config.overwrite else config.commit_every_images,
        max_seconds=float("inf") if config.overwrite else config.commit_every_s,
    )
    while not chunks.exhausted:
        index = len(run.record.chunks)
        rows = output_runs.write_staged_files(
            chunks.next_chunk(),
            staging.join(output_runs.chunk_name(index)),
            PREDICTION_SCHEMA,
            config.rows_per_file or DEFAULT_ROWS_PER_FILE,
        )
        if rows == 0:
            break
        lease.verify()
        chunk_files = output_runs.commit_chunk(output, staging, run.record.run_id, index, partition)
        chunk = ChunkRecord(index=index, rows=rows, files=chunk_files, committed=output_runs.now())
        run.update(chunks=[*run.record.chunks, chunk], files=[*run.record.files, *chunk_files])
        if not chunks.exhausted:  # a run of one chunk says so in its last line
            committed = sum(chunk.rows for chunk in run.record.chunks)
            logger.info("committed chunk %d: %d rows (%d of %d images)", index, rows, committed, len(paths))
    output_runs.end_staging(output, staging)


def _run_monitor(config: PredictConfig, metadata):
    """The run's monitor, against the artifact's reference profile (None for an artifact without one)."""
    from imgcls.monitoring.profile import read_profile
    from imgcls.monitoring.run_monitor import RunMonitor

    reference = read_profile(config.model, config.storage.endpoint_url) if config.monitoring else None
    return RunMonitor(
        metadata.class_names, reference, config.min_score, review_size=config.review,
        ranked_by="entropy" if metadata.task == "multilabel" else "margin",
        min_images=config.drift_min_images, false_alarm_rate=config.drift_false_alarm_rate, enabled=config.monitoring,
    )  # fmt: skip


def _write_review(config: PredictConfig, output, run_id: str, monitor, lease) -> ReviewRecord | None:
    """The review queue, after the run's rows are committed: its Parquet file under output/_review/,
    and with review_folder, copies of its images there."""
    from imgcls.monitoring.review import copy_for_labelling, write_review

    if monitor.review is None:
        return None
    table = monitor.review.table()
    lease.verify()
    record = ReviewRecord(file=write_review(output, run_id, table), rows=table.num_rows, ranked_by=monitor.review.ranked_by)
    if config.review_folder:
        copied, skipped = copy_for_labelling(table, config.review_folder, config.storage.endpoint_url, config.max_image_bytes)
        record = record.model_copy(update={"copied_to": config.review_folder, "copied": copied, "copy_skipped": skipped})
        logger.info("review: copied %d image(s) to %s (%d already there or unreadable)", copied, config.review_folder, skipped)
    logger.info("review: the %d least certain image(s) (by %s) in %s", table.num_rows, record.ranked_by, record.file)
    return record


def _log_monitoring(monitoring, drift: DriftReport | None) -> None:
    if monitoring is None or drift is None:
        return
    below = "" if monitoring.below_min_score_share is None else f", {100 * monitoring.below_min_score_share:.1f}% below min-score"
    mean_score = "n/a" if monitoring.score.mean is None else f"{monitoring.score.mean:.3f}"
    logger.info(
        "monitoring: %d images, mean score %s%s, %.1f%% errored, %.2f s", monitoring.images, mean_score, below,
        100 * monitoring.errored_share, monitoring.seconds,
    )  # fmt: skip
    if drift.status == "drift":
        logger.warning("DRIFT: %s (score %.2f, threshold %g)", drift.message, drift.score, drift.threshold)
    elif drift.status == "ok":
        logger.info("drift: none (score %.2f, threshold %g)", drift.score, drift.threshold)
    else:
        logger.info("drift: not tested, %s", drift.message)
