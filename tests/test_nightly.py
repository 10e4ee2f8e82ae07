"""Nightly semantics of bulk prediction: reruns skip done work, new arrivals only, --overwrite,
atomic runs that survive a SIGKILL, run records, min-score, partitions and file sizes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT
from image_factory import write_pattern_dataset

from imgcls import predict
from imgcls.config import PredictConfig


def rows(output: Path) -> list[dict]:
    return pads.dataset(str(output), format="parquet").to_table().to_pylist()


def run_records(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "_runs").glob("*.json"))]


@pytest.fixture
def images(pattern_holdout, tmp_path) -> Path:
    root = tmp_path / "images"
    shutil.copytree(pattern_holdout, root)
    return root


def test_reruns_classify_only_new_images_and_overwrite_replaces(trained_one_worker, images, tmp_path):
    result, _ = trained_one_worker
    output = tmp_path / "predictions"
    config = PredictConfig(model=result.artifact_uri, input=str(images), output=str(output))
    first = predict.run(config)
    assert first.classified == 20 and len(rows(output)) == 20
    second = predict.run(config)
    assert second.already_done == 20 and second.classified == 0 and len(rows(output)) == 20
    write_pattern_dataset(images / "new", per_class=3, seed=9)  # 6 new arrivals in two class folders
    for extra in sorted((images / "new").rglob("*.png"))[5:]:
        extra.unlink()
    third = predict.run(config)
    assert third.already_done == 20 and third.classified == 5
    table = rows(output)
    assert len(table) == 25 and len({row["path"] for row in table}) == 25
    replaced = predict.run(config.model_copy(update={"overwrite": True}))
    assert replaced.classified == 25
    table = rows(output)
    assert len(table) == 25 and len({row["path"] for row in table}) == 25
    assert [path.name for path in output.iterdir() if path.name.startswith("run-")] == [f"run-{replaced.run_id}"]
    records = run_records(output)
    assert [record["status"] for record in records] == ["succeeded"] * 4
    assert [record["already_done"] for record in records] == [0, 20, 20, 0]
    assert all(record["model_version"] == result.model_version and record["finished"] for record in records)
    assert {record["model_placement"] for record in records if record["images_listed"] > record["already_done"]} == {
        "driver"
    }


def test_min_score_partitions_and_rows_per_file(trained_one_worker, images, tmp_path):
    result, _ = trained_one_worker
    output = tmp_path / "partitioned"
    summary = predict.run(
        PredictConfig(model=result.artifact_uri, input=str(images), output=str(output), min_score=1.0,
                      partition_by="run_date", rows_per_file=4)  # fmt: skip
    )
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 20 and set(table.column("label").to_pylist()) == {"unknown"}
    assert all(labels[0] in ("horizontal", "vertical") for labels in table.column("top_k_labels").to_pylist())
    assert len(set(table.column("run_date").to_pylist())) == 1
    files = list(output.glob("run_date=*/run-*/chunk-*/*.parquet"))
    assert len(files) == len(summary.files) >= 5
    assert all(pads.dataset(str(path)).count_rows() <= 4 for path in files)


def test_a_killed_run_leaves_nothing_visible_and_the_rerun_completes(ray_session, trained_one_worker, tmp_path):
    result, _ = trained_one_worker
    images = tmp_path / "many"
    write_pattern_dataset(images, per_class=1500, size=16, seed=11)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", result.artifact_uri,
               "--input", str(images), "--output", str(output), "--batch-size", "16", "--set", "decode_batch_size=16"]  # fmt: skip
    # The killed run has an actor pool on the suite's Ray; the rerun, the default for 3,000 images,
    # runs in its own process and needs no Ray: it is given none.
    pooled = [*command, "--set", "placement=actor_pool"]
    environment = {**os.environ, "RAY_ADDRESS": ray_session}
    without_ray = {key: value for key, value in environment.items() if key != "RAY_ADDRESS"}
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(pads.dataset(str(output), format="parquet").count_rows())
            except (OSError, ValueError):
                pass  # no output yet, or a run folder renamed between listing and reading
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    killed = subprocess.Popen(pooled, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((output / "_staging").glob("*/chunk-*/*.parquet")):  # mid-run: part of the results staged
        assert time.monotonic() < deadline and killed.poll() is None, "the run never staged any file"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    time.sleep(0.5)
    assert set(seen) <= {0}, f"a reader saw part of the killed run: {sorted(set(seen))}"
    assert run_records(output)[0]["status"] == "running"
    rerun = subprocess.run(command, env=without_ray, capture_output=True, text=True, timeout=600)
    stop.set()
    poller.join(timeout=10)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "3000 images listed, 0 already done, 3000 classified, 0 errored" in rerun.stdout, rerun.stdout[-3000:]
    assert "Started a local Ray instance" not in rerun.stderr
    table = rows(output)
    assert len(table) == 3000 and len({row["path"] for row in table}) == 3000
    assert set(seen) <= {0, 3000}, f"a reader saw a partial run: {sorted(set(seen))}"
    records = run_records(output)
    assert [record["status"] for record in records] == ["abandoned", "succeeded"]
    assert [record["model_placement"] for record in records] == ["actor_pool", "driver"]
    assert not (output / "_staging").exists()


def test_run_ids_sort_in_the_order_runs_started():
    from imgcls.platform.output_runs import new_run_id

    ids = []
    for _ in range(5):
        ids.append(new_run_id())
        time.sleep(0.002)  # small reruns now finish within a second of each other
    assert ids == sorted(ids) and len(set(ids)) == 5
