"""Chunked commits of bulk runs: every row in exactly one chunk, each chunk visible whole, and a run
SIGKILLed after its first committed chunk resumes from there (the rerun classifies only the rest).
No Ray: these runs stay in the job's process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
from conftest import REPO_ROOT
from image_factory import write_pattern_dataset

from imgcls import predict
from imgcls.config import PredictConfig
from imgcls.platform.chunks import ChunkedTables


def visible_rows(output: Path) -> pa.Table:
    return pads.dataset(str(output), format="parquet").to_table()


def run_records(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "_runs").glob("*.json"))]


def test_chunks_hold_every_row_once_and_cut_tables_at_the_boundary():
    tables = [pa.table({"n": list(range(start, start + size))}) for start, size in ((0, 5), (5, 0), (5, 9), (14, 3))]
    chunks = ChunkedTables(tables, max_rows=4, max_seconds=float("inf"))
    seen = []
    while not chunks.exhausted:
        chunk = [value for table in chunks.next_chunk() for value in table.column("n").to_pylist()]
        if chunk:
            seen.append(chunk)
    assert seen == [list(range(start, min(start + 4, 17))) for start in range(0, 17, 4)]


def test_a_chunk_also_ends_after_its_time():
    def slow():
        for index in range(4):
            time.sleep(0.3)
            yield pa.table({"n": [index]})

    chunks = ChunkedTables(slow(), max_rows=100, max_seconds=0.5)
    sizes = []
    while not chunks.exhausted:
        sizes.append(sum(table.num_rows for table in chunks.next_chunk()))
    assert sum(sizes) == 4 and len([size for size in sizes if size]) >= 2


def test_a_run_commits_in_chunks_listed_in_its_record(tiny_artifact, tmp_path):
    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=15, size=16, seed=4)
    output = tmp_path / "out"
    summary = predict.run(PredictConfig(model=tiny_artifact, input=str(images), output=str(output), commit_every_images=7))
    table = visible_rows(output)
    assert table.num_rows == 30 and len(set(table.column("path").to_pylist())) == 30
    (record,) = run_records(output)
    assert record["status"] == "succeeded" and [chunk["rows"] for chunk in record["chunks"]] == [7, 7, 7, 7, 2]
    run_folder = output / f"run-{summary.run_id}"
    assert sorted(path.name for path in run_folder.iterdir()) == ["_run.json", *[f"chunk-{index:05d}" for index in range(5)]]
    assert sorted(record["files"]) == sorted(str(path) for path in run_folder.glob("chunk-*/*.parquet"))
    assert not (output / "_staging").exists()


def test_a_run_killed_after_its_first_chunk_resumes_from_there(tiny_artifact, tmp_path):
    images = tmp_path / "images"
    write_pattern_dataset(images, per_class=1000, size=16, seed=5)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", tiny_artifact, "--input", str(images),
               "--output", str(output), "--set", "placement=driver"]  # fmt: skip
    slowly_in_chunks = ["--batch-size", "1", "--set", "commit_every_images=150", "--set", "decode_batch_size=8"]
    process = subprocess.Popen([*command, *slowly_in_chunks], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    # Until the first chunk is committed: seconds alone, minutes beside the suite's other processes.
    deadline = time.monotonic() + 300
    first_chunk = False
    while not first_chunk and time.monotonic() < deadline and process.poll() is None:
        records = run_records(output) if (output / "_runs").exists() else []
        first_chunk = bool(records and records[0]["chunks"])
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]!r}"
    assert first_chunk, "no chunk was committed within 300 s"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    (killed,) = run_records(output)
    committed = sum(chunk["rows"] for chunk in killed["chunks"])
    assert killed["status"] == "running" and committed >= 150
    assert visible_rows(output).num_rows >= committed  # a chunk committed just before the kill may be unrecorded

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = run_records(output)
    assert [record["status"] for record in records] == ["abandoned", "succeeded"]
    assert records[1]["already_done"] >= committed and records[1]["already_done"] % 150 == 0
    table = visible_rows(output)
    paths = table.column("path").to_pylist()
    assert len(paths) == 2000 and len(set(paths)) == 2000  # every image exactly once
    assert not (output / "_staging").exists()
