"""Repeat-safe Parquet output: staged runs, atomic commits, run records and what is already done.

Layout under the output URI:
    [run_date=YYYY-MM-DD/]run-<run_id>/chunk-NNNNN/part-*.parquet   committed chunks of runs (what readers see)
    [run_date=YYYY-MM-DD/]run-<run_id>/_run.json        the marker that proves imgcls wrote the run
    _staging/<run_id>/                                   a run's chunk being written (hidden from readers)
    _runs/<run_id>.json                                  one record per run: input, model, counts, times, status,
                                                         monitoring and drift (see `imgcls.monitoring`)
    _review/<run_id>.parquet                             a run's least certain images, with --review N
    _report/                                             the trend report's default folder (`imgcls report`)
    _lock                                                the one writer's lease (see `imgcls.output_lease`)
Readers (pyarrow.dataset, pandas, Ray Data) skip `_`-prefixed files and folders, so only committed
chunks are visible. A run commits its rows in chunks (`commit_every_images`, `commit_every_s`): on a
local or network file system each chunk appears in one directory rename, all or nothing. Object stores
have no rename: each file is copied in (each copy atomic), so a reader listing in the instant of a
commit may see part of that chunk; the run record, rewritten after each chunk, lists the chunks that
are complete. A killed run keeps its committed chunks; the next run classifies only what they lack.
(Runs committed before chunks hold their files directly in the run folder; they read the same.)

Ownership: a run folder is imgcls's only when its `_run.json` names its run id and `_runs/` holds
that run's record (runs committed before markers existed: when their record lists every file in
the folder). Only such folders are ever read, rewritten or deleted; anything else under the output
is the user's and is left alone.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Literal

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgcls.errors import DataError, StorageError, clip
from imgcls.monitoring.summaries import DriftReport, ReviewRecord, RunMonitoring
from imgcls.platform import storage

logger = logging.getLogger(__name__)

STAGING = "_staging"
RUNS = "_runs"
# imgcls's own folders beside the runs: each run's review queue, and the trend report's default place.
REVIEW = "_review"
REPORT = "_report"
RUN_MARKER = "_run.json"
LEASE_FILES = ("_lock", "_lock.update")
RUN_FOLDER = re.compile(r"^run-(?P<run_id>[0-9]{8}T[0-9]{9}Z-[0-9a-f]{8})$")


def new_run_id() -> str:
    """Start time to the millisecond, then a random part: run ids (and `_runs/` listings) sort in the
    order the runs started, also for small reruns a second apart or less."""
    started = datetime.now(timezone.utc)
    return f"{started.strftime('%Y%m%dT%H%M%S')}{started.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}"


def _child_directories(location: storage.Location) -> list[str]:
    selector = pafs.FileSelector(location.path, allow_not_found=True)
    with storage.user_facing_errors(location, "list"):
        infos = location.filesystem.get_file_info(selector)
    return [info.path for info in infos if info.type == pafs.FileType.Directory]


def _files_under(location: storage.Location) -> list[str]:
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    with storage.user_facing_errors(location, "list"):
        infos = location.filesystem.get_file_info(selector)
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def _relative(output: storage.Location, path: str) -> str:
    return path[len(output.path) :].lstrip("/")


def _read_json(location: storage.Location) -> dict[str, Any] | None:
    try:
        loaded = json.loads(storage.read_bytes(location))
    except (ValueError, StorageError):
        return None
    return loaded if isinstance(loaded, dict) else None


class ChunkRecord(BaseModel):
    """One committed chunk of a run: its rows became visible together."""

    index: int
    rows: int
    files: list[str]
    committed: str


class RunRecord(BaseModel):
    """`_runs/<run_id>.json`: one bulk run, what it was given and what it did. Written when the run
    starts (status running) and again when it ends; a killed run's record is marked abandoned by the
    next run. Keys other runs or tools added are kept."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    run_id: str
    status: Literal["running", "succeeded", "failed", "abandoned"]
    input: str
    output: str
    model: str
    model_version: str
    overwrite: bool = False
    images_listed: int = 0
    already_done: int = 0
    duplicates_dropped: int = 0
    model_placement: str | None = None
    placement_reason: str | None = None
    started: str
    finished: str | None = None
    classified: int | None = None
    errored: int | None = None
    superseded_rows: int | None = None
    seconds: float | None = None
    images_per_second: float | None = None
    files: list[str] = Field(default_factory=list, description="URIs of the run's committed Parquet files.")
    chunks: list[ChunkRecord] = Field(default_factory=list, description="The run's committed chunks, in order.")
    error: str | None = None
    thresholds: dict[str, float] | None = Field(
        default=None, description="Multi-label models: the decision threshold used per class (None: single-label)."
    )
    monitoring: RunMonitoring | None = Field(default=None, description="What this run's images looked like to the model.")
    drift: DriftReport | None = Field(default=None, description="This run against the artifact's reference profile.")
    review: ReviewRecord | None = Field(default=None, description="The run's review queue of least certain images.")
    registered_model: dict[str, str | None] | None = Field(
        default=None, description="With --model models:/...: the registered model version it resolved to (name, "
        "version, alias, source); `model` is then the artifact that version's source gave."
    )  # fmt: skip


def write_run_record(output: storage.Location, record: RunRecord) -> None:
    storage.write_text_atomic(output.join(RUNS, f"{record.run_id}.json"), record.model_dump_json(indent=2))


def read_run_record(output: storage.Location, run_id: str) -> RunRecord | None:
    """The run's record, or None when there is none or it is not one of ours."""
    location = output.join(RUNS, f"{run_id}.json")
    values = _read_json(location) if storage.exists(location) else None
    try:
        return RunRecord.model_validate(values) if values is not None else None
    except ValidationError:
        return None


def begin_staging(output: storage.Location, run_id: str, model_version: str) -> storage.Location:
    """The run's staging folder, with the marker that proves it (and, once committed, its run
    folder) is imgcls's."""
    staging = output.join(STAGING, run_id)
    marker = {"run_id": run_id, "model_version": model_version, "written_by": "imgcls", "started": now()}
    storage.write_text_atomic(staging.join(RUN_MARKER), json.dumps(marker, indent=2))
    return staging


def _marker_names(folder: storage.Location, run_id: str) -> bool:
    marker = _read_json(folder.join(RUN_MARKER))
    return marker is not None and marker.get("run_id") == run_id


def discard_stale_staging(output: storage.Location) -> None:
    """Remove what killed runs left in _staging (called under the output's lease, so no live run owns
    any of it); their records are marked abandoned. A folder there that imgcls cannot prove it wrote
    (no marker naming it, no run record) is left alone."""
    for path in _child_directories(output.join(STAGING)):
        run_id = path.rstrip("/").rsplit("/", 1)[-1]
        folder = storage.Location(output.filesystem, path, output.endpoint_url)
        record = read_run_record(output, run_id)
        if record is None and not _marker_names(folder, run_id):
            logger.warning("left %s alone in %s: imgcls did not write it", run_id, output.join(STAGING).uri)
            continue
        with storage.user_facing_errors(folder, "remove the stale staging folder"):
            output.filesystem.delete_dir(path)
        if record is not None and record.status == "running":
            write_run_record(output, record.model_copy(update={"status": "abandoned"}))
        logger.info("discarded the unfinished run %s left in %s", run_id, output.join(STAGING).uri)


def discard_own_staging(output: storage.Location, run_id: str) -> None:
    """A failed run's staged, uncommitted rows: removed at once where the store allows (otherwise
    the next run does it). Its committed chunks stay."""
    staging = output.join(STAGING, run_id)
    try:
        if storage.exists(staging):
            end_staging(output, staging)
    except (OSError, StorageError) as error:
        logger.warning("could not remove the failed run's staging folder %s (the next run will): %s", staging.uri, error)


@dataclass
class OutputContents:
    """What one listing of an output holds: imgcls's committed runs (run id -> folder and files, in
    run order) and the files imgcls did not write."""

    runs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)

    def parquet_files(self) -> list[str]:
        return [path for _, (_, files) in sorted(self.runs.items()) for path in files if path.endswith(".parquet")]


def survey(output: storage.Location) -> OutputContents:
    """Sort every file under the output into imgcls's (records, lease, staging, owned runs) and foreign."""
    files = _files_under(output)
    records = {
        _relative(output, path)[len(RUNS) + 1 : -len(".json")]
        for path in files
        if _relative(output, path).startswith(f"{RUNS}/") and path.endswith(".json")
    }
    candidates: dict[str, tuple[str, list[str]]] = {}
    foreign: list[str] = []
    for path in files:
        parts = _relative(output, path).split("/")
        if parts[0] in (RUNS, STAGING, REVIEW, REPORT) or (len(parts) == 1 and parts[0] in LEASE_FILES):
            continue
        run_part = 1 if len(parts) >= 3 and _is_partition(parts[0]) else 0
        match = RUN_FOLDER.match(parts[run_part]) if len(parts) > run_part + 1 else None
        if match is None:
            foreign.append(path)
            continue
        folder = "/".join([output.path.rstrip("/"), *parts[: run_part + 1]])
        candidates.setdefault(match["run_id"], (folder, []))[1].append(path)
    contents = OutputContents(foreign=foreign)
    for run_id, (folder, run_files) in candidates.items():
        if _run_is_owned(output, run_id, folder, run_files, run_id in records):
            contents.runs[run_id] = (folder, sorted(path for path in run_files if not path.endswith(RUN_MARKER)))
        else:
            contents.foreign.extend(run_files)
    return contents


def _is_partition(name: str) -> bool:
    return "=" in name and not name.startswith(("_", "."))


def _run_is_owned(output: storage.Location, run_id: str, folder: str, files: list[str], has_record: bool) -> bool:
    if not has_record:
        return False
    location = storage.Location(output.filesystem, folder, output.endpoint_url)
    if any(path.endswith(f"/{RUN_MARKER}") for path in files):
        return _marker_names(location, run_id)
    # Runs committed before run markers: the record must list every file of the folder.
    record = read_run_record(output, run_id)
    listed = {uri.removeprefix("s3://") for uri in (record.files if record else [])}
    return bool(files) and set(files) <= listed


def refuse_foreign_files(output: storage.Location, contents: OutputContents) -> None:
    if contents.foreign:
        examples = ", ".join(clip(_relative(output, path), 120) for path in contents.foreign[:3])
        raise DataError(
            f"Output {output.uri} holds {len(contents.foreign)} file(s) that imgcls did not write (e.g. {examples}). "
            "Predictions go to a folder of their own: choose an empty or imgcls output folder, or pass "
            "--allow-foreign-files (--set allow_foreign_files=true) to write beside them; they are then left "
            "alone, never read or deleted."
        )


def committed_files(output: storage.Location) -> list[str]:
    """Paths of every committed Parquet file of imgcls's runs, in run order."""
    return survey(output).parquet_files()


def done_paths(output: storage.Location, model_version: str, contents: OutputContents | None = None) -> set[str]:
    """Image paths already classified by `model_version` in committed runs without an error: an image
    whose row has an error is tried again by the next run (only three columns are read)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = (contents or survey(output)).parquet_files()
    if not files:
        return set()
    with storage.user_facing_errors(output, "read the committed rows of"):
        dataset = pads.dataset(files, filesystem=output.filesystem, format="parquet")
        table = dataset.to_table(
            columns=["path"], filter=(pc.field("model_version") == model_version) & pc.field("error").is_null()
        )
    return set(table.column("path").to_pylist())


def supersede_older_rows(output: storage.Location, model_version: str, contents: OutputContents | None = None) -> int:
    """Keep one visible row per image and model version, the newest: rows of earlier runs for an
    image that a later run classified again (a retried error) are removed from their files. Each
    rewritten file is replaced atomically; returns the number of rows removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    contents = contents or survey(output)
    newest_file: dict[str, int] = {}
    files = contents.parquet_files()
    paths_by_file: list[list[str]] = []
    for position, path in enumerate(files):
        with storage.user_facing_errors(output, "read"), output.filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle, columns=["path", "model_version"])
        paths = [p for p, version in zip(table.column("path").to_pylist(), table.column("model_version").to_pylist())
                 if version == model_version]  # fmt: skip
        paths_by_file.append(paths)
        for image in paths:
            newest_file[image] = position
    removed = 0
    for position, (path, paths) in enumerate(zip(files, paths_by_file)):
        stale = {image for image in paths if newest_file[image] != position}
        if not stale:
            continue
        with storage.user_facing_errors(output, "read"), output.filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle)
        superseded = pc.and_(pc.equal(table.column("model_version"), model_version),
                             pc.is_in(table.column("path"), pa.array(sorted(stale), pa.string())))  # fmt: skip
        kept = table.filter(pc.invert(superseded))
        storage.write_parquet_atomic(storage.Location(output.filesystem, path, output.endpoint_url), kept)
        removed += table.num_rows - kept.num_rows
    if removed:
        logger.info("replaced %d earlier row(s) of images classified again (retried errors)", removed)
    return removed


def add_missing_columns(output: storage.Location, schema: pa.Schema, contents: OutputContents | None = None) -> int:
    """Rewrite each committed part that lacks columns of `schema` (written by an earlier imgcls) with
    them appended as nulls, each file atomically; returns the number of files rewritten. Readers of
    the whole output take its schema from one file, so a mix would drop the new columns silently.
    Only the file's footer is read for files that are up to date."""
    import pyarrow.parquet as pq

    rewritten = 0
    for path in (contents or survey(output)).parquet_files():
        with storage.user_facing_errors(output, "read"), output.filesystem.open_input_file(path) as handle:
            names = pq.read_schema(handle).names
        missing = [column for column in schema if column.name not in names]
        if not missing:
            continue
        with storage.user_facing_errors(output, "read"), output.filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle)
        for column in missing:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
        extra = [name for name in table.column_names if name not in schema.names]
        table = table.select([*schema.names, *extra])
        storage.write_parquet_atomic(storage.Location(output.filesystem, path, output.endpoint_url), table)
        rewritten += 1
    if rewritten:
        logger.info("added column(s) of the current schema (as nulls) to %d part(s) written by an earlier imgcls", rewritten)
    return rewritten


# Rows per Parquet row group: the actor pool hands back a block (about 1,000 rows) at a time, and a
# row group per block would leave readers a thousand tiny groups in a large file.
ROW_GROUP_ROWS = 65_536


def write_staged_files(
    tables: Iterable[pa.Table], staging: storage.Location, schema: pa.Schema, rows_per_file: int
) -> int:
    """Stream Arrow tables into `part-NNNNN.parquet` files of at most `rows_per_file` rows under the
    run's staging folder, holding at most one row group in memory; returns the number of rows written.

    The job's driver writes the (small) prediction rows itself: Ray Data's Write operator runs a
    task per block, and on a busy node each of those tasks starts a new worker process."""
    import pyarrow.parquet as pq

    if staging.is_local:
        staging.filesystem.create_dir(staging.path, recursive=True)
    writer: pq.ParquetWriter | None = None
    stream = None
    files = rows_in_file = total = 0
    pending: list[pa.Table] = []

    # The storage's own failures only: an error of the stream of tables passes as it is.
    def open_file() -> None:
        nonlocal writer, stream, files
        with storage.user_facing_errors(staging, "write the run's rows to"):
            stream = staging.filesystem.open_output_stream(staging.join(f"part-{files:05d}.parquet").path)
            writer = pq.ParquetWriter(stream, schema)
        files += 1

    def flush() -> None:
        if pending:
            with storage.user_facing_errors(staging, "write the run's rows to"):
                writer.write_table(pa.concat_tables(pending))
            pending.clear()

    def close() -> None:
        nonlocal writer, stream
        if writer is not None:
            flush()
            with storage.user_facing_errors(staging, "write the run's rows to"):
                writer.close()
                stream.close()
        writer = stream = None

    try:
        for table in tables:
            table = table.cast(schema)
            offset = 0
            while offset < table.num_rows:
                if writer is None:
                    open_file()  # at once, not at the first flush: the file shows the run is under way
                    rows_in_file = 0
                take = min(rows_per_file - rows_in_file, table.num_rows - offset)
                pending.append(table.slice(offset, take))
                offset += take
                rows_in_file += take
                total += take
                if rows_in_file == rows_per_file:
                    close()
                elif sum(part.num_rows for part in pending) >= ROW_GROUP_ROWS:
                    flush()
    finally:
        close()
    return total


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


def run_folder(output: storage.Location, run_id: str, partition: str | None) -> storage.Location:
    return (output.join(partition) if partition else output).join(f"run-{run_id}")


def commit_chunk(
    output: storage.Location, staging: storage.Location, run_id: str, index: int, partition: str | None
) -> list[str]:
    """Make one staged chunk (`staging/chunk-NNNNN/`) visible in the run's folder: one rename on a file
    system, file by file on an object store. The run's marker goes in first, so a commit cut short
    leaves a folder that is provably imgcls's (its rows count as done: each image stays once). Returns
    the chunk's Parquet files."""
    target_run = run_folder(output, run_id, partition)
    chunk = staging.join(chunk_name(index))
    target = target_run.join(chunk_name(index))
    staged = _files_under(chunk)
    with storage.user_facing_errors(output, "commit a chunk of the run to"):
        marker = target_run.join(RUN_MARKER)
        if not storage.exists(marker):
            storage.write_bytes_atomic(marker, storage.read_bytes(staging.join(RUN_MARKER)))
        if output.is_local:
            output.filesystem.move(chunk.path, target.path)
        else:
            for path in staged:
                output.filesystem.move(path, target.join(path[len(chunk.path) :].lstrip("/")).path)
            output.filesystem.delete_dir(chunk.path)
    return [target.join(path[len(chunk.path) :].lstrip("/")).uri for path in staged]


def end_staging(output: storage.Location, staging: storage.Location) -> None:
    """Remove the run's staging folder once its last chunk is committed (and `_staging` when empty)."""
    with storage.user_facing_errors(output, "clean up the staging folder of"):
        output.filesystem.delete_dir(staging.path)
        staging_root = output.join(STAGING)
        if not _child_directories(staging_root) and not _files_under(staging_root):
            output.filesystem.delete_dir(staging_root.path)  # object stores keep an empty marker behind


def remove_other_runs(output: storage.Location, run_id: str, contents: OutputContents | None = None) -> int:
    """--overwrite: drop every committed imgcls run but `run_id`; returns how many runs went. Folders
    imgcls cannot prove it wrote are never touched."""
    removed = 0
    for other, (folder, _) in (contents or survey(output)).runs.items():
        if other != run_id:
            with storage.user_facing_errors(output, "remove an earlier run from"):
                output.filesystem.delete_dir(folder)
            removed += 1
    return removed


def now() -> str:
    return datetime.now(timezone.utc).isoformat()
