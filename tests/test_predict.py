"""Bulk prediction through a real Ray Data actor pool into Parquet, and small runs in the job's own process."""

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT

from imgcls import predict
from imgcls.data import reading
from imgcls.inference.predictor import decode_arguments
from imgcls.modeling.artifact import load_artifact
from imgcls.config import PredictConfig
from imgcls.errors import DataError, UserError
from imgcls.data.images import decode_image
from imgcls.inference import actor_pool, in_process
from imgcls.inference import placement as placements
from imgcls.inference.predictor import PREDICTION_SCHEMA, Predictor


@pytest.fixture(scope="module")
def prediction_input(pattern_holdout, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_input") / "images"
    shutil.copytree(pattern_holdout, root)
    (root / "horizontal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


@pytest.fixture(scope="module")
def predictions(trained_one_worker, prediction_input, tmp_path_factory):
    result, _ = trained_one_worker
    output = tmp_path_factory.mktemp("predictions") / "out"
    # An autoscaling pool (1 to 2 actors). The nightly and evaluate tests run with the model in the
    # driver (the default for small runs); the S3 test runs both.
    config = PredictConfig(
        model=result.artifact_uri, input=str(prediction_input), output=str(output), num_actors=1, max_actors=2
    )
    summary = predict.run(config)
    table = pads.dataset(str(output), format="parquet").to_table()
    return summary, table, result


def test_one_row_per_image_with_the_exact_schema(predictions, prediction_input):
    summary, table, result = predictions
    inputs = sorted(str(path) for path in prediction_input.rglob("*.png"))
    assert len(inputs) == 21
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert sorted(table.column("path").to_pylist()) == inputs
    assert summary.images_listed == 21 and summary.classified == 20 and summary.errored == 1
    assert set(table.column("model_version").to_pylist()) == {result.model_version}


def test_labels_come_from_the_artifact_and_are_mostly_right(predictions):
    _, table, _ = predictions
    rows = [row for row in table.to_pylist() if row["error"] is None]
    assert {row["label"] for row in rows} <= {"horizontal", "vertical"}
    correct = sum(row["label"] == row["path"].split("/")[-2] for row in rows)
    assert correct / len(rows) >= 0.9
    for row in rows:
        assert row["top_k_labels"][0] == row["label"]
        assert row["top_k_scores"][0] == pytest.approx(row["score"])
        assert len(row["top_k_labels"]) == 2  # default top-k is min(5, classes)
        assert sum(row["top_k_scores"]) == pytest.approx(1.0, abs=1e-5)
        assert row["top_k_scores"] == sorted(row["top_k_scores"], reverse=True)


def test_corrupt_file_gives_an_error_row(predictions):
    _, table, _ = predictions
    bad = [row for row in table.to_pylist() if row["error"] is not None]
    assert len(bad) == 1
    assert bad[0]["path"].endswith("corrupt.png")
    assert bad[0]["label"] is None and bad[0]["score"] is None and bad[0]["top_k_labels"] is None


def test_scores_match_the_artifact_model_on_the_same_pixels(predictions):
    _, table, result = predictions
    model, metadata = load_artifact(result.artifact_uri)
    rows = [row for row in table.to_pylist() if row["error"] is None]
    pixels = np.stack(
        [decode_image(open(row["path"], "rb").read(), metadata.image_size, metadata.channels, 10**8) for row in rows]
    ).astype(np.float32)
    positive = model.predict(pixels, verbose=0)[:, 0]
    vertical_index = metadata.class_names.index("vertical")
    for row, probability in zip(rows, positive):
        expected = {"vertical": probability, "horizontal": 1 - probability}
        assert vertical_index == 1
        assert row["score"] == pytest.approx(expected[row["label"]], abs=1e-5)


def test_the_model_in_the_driver_gives_the_pools_rows(predictions, prediction_input, tmp_path):
    pooled_summary, pooled, result = predictions
    output = tmp_path / "driver"
    summary = predict.run(PredictConfig(model=result.artifact_uri, input=str(prediction_input), output=str(output)))
    table = pads.dataset(str(output), format="parquet").to_table()
    assert (summary.classified, summary.errored) == (pooled_summary.classified, pooled_summary.errored) == (20, 1)
    by_path = {row["path"]: row for row in pooled.to_pylist()}
    assert sorted(by_path) == sorted(table.column("path").to_pylist())
    for row in table.to_pylist():
        twin = by_path[row["path"]]
        assert (row["label"], row["top_k_labels"], row["error"]) == (twin["label"], twin["top_k_labels"], twin["error"])
        if row["error"] is None:
            assert row["score"] == pytest.approx(twin["score"], abs=1e-5)
    records = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    assert [record["model_placement"] for record in records] == ["driver"]


def test_placement_small_runs_stay_in_the_driver_and_sized_or_forced_pools_are_kept():
    def placed(num_images: int, **settings) -> placements.ModelPlacement:
        return placements.choose_placement(num_images, PredictConfig(model="m", input="in", output="out", **settings))

    small = placed(4_999)
    assert (small.kind, small.reserved_cpus) == ("driver", 0) and "pool_min_images=5000" in small.reason
    assert placed(10, placement="actor_pool").kind == "actor_pool"
    assert placed(50_000, placement="driver").kind == "driver"
    for pool in ({"use_gpu": True}, {"num_actors": 1}, {"max_actors": 3}):
        assert placed(10, **pool).kind == "actor_pool", pool
        with pytest.raises(ValueError, match="placement driver has none"):
            PredictConfig(model="m", input="in", output="out", placement="driver", **pool)


def test_a_large_run_on_a_one_machine_cluster_stays_in_the_driver_and_holds_its_cpus(
    ray_session, trained_one_worker, prediction_input, tmp_path
):
    import ray

    from imgcls.platform.ray_runtime import reserved_cpus

    # The suite's Ray is this machine alone (2 CPUs): a run of at least pool_min_images stays here,
    # with one decode thread per free CPU, and holds those CPUs through Ray while it runs.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2:  # earlier tests' actors giving their CPUs back
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)
    placement = placements.choose_placement(5_000, PredictConfig(model="m", input="in", output="out"))
    assert (placement.kind, placement.reserved_cpus, placement.decode_threads) == ("driver", 2, 2)
    assert "this machine alone" in placement.reason
    with reserved_cpus(2):
        assert ray.available_resources().get("CPU", 0) == 0
        held = placements.choose_placement(5_000, PredictConfig(model="m", input="in", output="out"))
        assert held.kind == "actor_pool" and "held" in held.reason
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, "the held CPUs were not given back"
        time.sleep(0.1)
    result, _ = trained_one_worker
    output = tmp_path / "large"
    summary = predict.run(
        PredictConfig(model=result.artifact_uri, input=str(prediction_input), output=str(output), pool_min_images=1)
    )
    assert (summary.classified, summary.errored) == (20, 1)
    (record,) = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    assert record["model_placement"] == "driver" and "this machine alone" in record["placement_reason"]


@pytest.mark.services
def test_a_cluster_of_several_nodes_or_a_big_node_gets_the_pool():
    # A real two-node Ray (two raylets on this machine), in a fresh process: this one has joined the suite's Ray.
    script = """
import sys
from imgcls.inference import placement as placements
from imgcls.config import PredictConfig
config = PredictConfig(model="m", input="in", output="out")
print("no Ray:", placements.choose_placement(5_000, config), "ray" in sys.modules)
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 9})
ray.init(address=cluster.address)
print("big node:", placements.choose_placement(5_000, config).reason)
print("small run:", placements.choose_placement(4_999, config).kind)
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print("two nodes:", placements.choose_placement(5_000, config).reason)
ray.shutdown()
cluster.shutdown()
"""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=REPO_ROOT, env=environment)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Without RAY_ADDRESS a job would start a private Ray on this machine alone: no Ray is even imported.
    cpus = len(os.sched_getaffinity(0))
    expected = f"kind='driver' reason='no Ray cluster in use; this machine has {cpus} CPUs'" if cpus <= 8 else "kind='actor_pool'"
    assert f"no Ray: {expected}" in finished.stdout and "False" in finished.stdout.split("\n")[0], finished.stdout
    assert "big node: this node has 9 CPUs, more than 8 decode threads use" in finished.stdout, finished.stdout
    assert "small run: driver" in finished.stdout
    assert "two nodes: the Ray cluster has 2 nodes" in finished.stdout, finished.stdout


def test_in_process_decoding_keeps_order_and_reads_ahead_a_bounded_number_of_blocks(
    trained_one_worker, prediction_input, monkeypatch
):
    result, _ = trained_one_worker
    _, metadata = load_artifact(result.artifact_uri)
    paths = sorted(str(path) for path in prediction_input.rglob("*.png"))
    started: list[int] = []
    decode_batch = reading.decode_batch

    def counted(batch, **arguments):
        started.append(len(batch["path"]))
        return decode_batch(batch, **arguments)

    monkeypatch.setattr(reading, "decode_batch", counted)
    monkeypatch.setattr(in_process, "IN_PROCESS_BLOCK_ROWS", 2)
    config = PredictConfig(model=result.artifact_uri, input=str(prediction_input), output="unused")
    blocks = in_process.decoded_on_threads(paths, 2, decode_arguments(config, metadata))
    first = next(blocks)
    time.sleep(1.0)  # every block submitted so far has had time to run; none past the bound is submitted
    assert len(started) == 4  # two threads, two blocks ahead: 8 of the 21 images, not all of them
    decoded = [first, *blocks]
    assert sum(started) == 21 and [len(block["path"]) for block in decoded] == [2] * 10 + [1]
    assert [str(path) for block in decoded for path in block["path"]] == paths
    for block in decoded:
        for path, image, error in zip(block["path"], block["image"], block["error"]):
            if path.endswith("corrupt.png"):
                assert error != ""
            else:
                assert error == ""
                expected = decode_image(Path(path).read_bytes(), metadata.image_size, metadata.channels, 10**8)
                np.testing.assert_array_equal(image, expected)


def test_a_small_job_shows_a_progress_bar_and_starts_no_ray(trained_one_worker, prediction_input, tmp_path):
    # On a terminal (a pseudo-terminal here), without RAY_ADDRESS: the run needs no Ray at all.
    result, _ = trained_one_worker
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), "--model", result.artifact_uri,
               "--input", str(prediction_input), "--output", str(tmp_path / "out")]  # fmt: skip
    terminal, job_side = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, which tqdm fills with nothing: give it a real width.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    job = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=job_side, stderr=job_side, env=environment)
    os.close(job_side)
    output = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the job closed its side of the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(terminal)
    assert job.wait(timeout=120) == 0, output.decode(errors="replace")[-3000:]
    text = output.decode(errors="replace")
    assert "classifying: 100%" in text and "21/21" in text, text[-3000:]
    assert "21 images listed, 0 already done, 20 classified, 1 errored" in text
    assert "Started a local Ray instance" not in text and "joining the Ray cluster" not in text, text[-3000:]


@pytest.mark.parametrize("placement", ["actor_pool", "auto"], ids=["actor_pool", "model_in_driver"])
def test_an_artifact_without_its_model_file_is_a_user_error(trained_one_worker, prediction_input, tmp_path, placement):
    # In a pool the error is raised in a model actor and reaches the driver as Ray's ActorDiedError.
    result, _ = trained_one_worker
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(Path(result.artifact_uri) / "metadata.json", broken)
    config = PredictConfig(
        model=str(broken), input=str(prediction_input), output=str(tmp_path / "out"), placement=placement
    )
    with pytest.raises(UserError, match="^No model.keras in the artifact at "):
        predict.run(config)


def test_predictor_top_k_is_capped_by_the_number_of_classes(trained_one_worker):
    result, _ = trained_one_worker
    predictor = Predictor.from_artifact(result.artifact_uri, top_k=5)
    batch = {
        "path": np.array(["a.png", "b.png"]),
        "image": np.zeros((2, 16, 16, 3), np.uint8),
        "error": np.array(["", "cannot read"]),
    }
    table = predictor(batch)
    assert table.column("top_k_labels").to_pylist()[0] in (["horizontal", "vertical"], ["vertical", "horizontal"])
    assert table.column("error").to_pylist() == [None, "cannot read"]


def test_empty_input_folder_is_a_data_error(trained_one_worker, tmp_path):
    result, _ = trained_one_worker
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No images found"):
        predict.run(PredictConfig(model=result.artifact_uri, input=str(tmp_path / "empty"), output=str(tmp_path / "o")))


def test_block_rows_grow_with_the_input_but_keep_every_decode_slot_busy():
    assert actor_pool.block_rows(20, decode_slots=2) == actor_pool.MIN_BLOCK_ROWS
    assert actor_pool.block_rows(2000, decode_slots=2) == 256  # 8 blocks: 4 per decode slot
    assert actor_pool.block_rows(6000, decode_slots=2) == 750
    assert actor_pool.block_rows(20000, decode_slots=2) == actor_pool.MAX_BLOCK_ROWS
    assert actor_pool.block_rows(20000, decode_slots=0) == actor_pool.MAX_BLOCK_ROWS


def test_staged_files_hold_at_most_rows_per_file_and_every_row_once(tmp_path):
    from imgcls.platform import output_runs, storage

    def batch(start: int, count: int) -> pa.Table:
        paths = [f"/images/{index}.png" for index in range(start, start + count)]
        return pa.table({"path": paths, "label": ["a"] * count, "score": pa.array([0.5] * count, pa.float64()),
                         "top_k_labels": [["a"]] * count, "top_k_scores": [[0.5]] * count,
                         "model_version": ["v1"] * count, "error": [None] * count,
                         "labels": [["a"]] * count, "margin": pa.array([0.0] * count, pa.float64()),
                         "entropy": pa.array([1.0] * count, pa.float64())})  # fmt: skip

    staging = storage.resolve(str(tmp_path / "staging"))
    written = output_runs.write_staged_files(
        iter([batch(0, 7), batch(7, 0), batch(7, 5)]), staging, PREDICTION_SCHEMA, rows_per_file=4
    )
    files = sorted((tmp_path / "staging").glob("*.parquet"))
    assert written == 12 and [path.name for path in files] == [f"part-{index:05d}.parquet" for index in range(3)]
    assert [pads.dataset(str(path)).count_rows() for path in files] == [4, 4, 4]
    assert pq.ParquetFile(files[1]).metadata.num_row_groups == 1  # rows 4-7 came from two tables
    table = pads.dataset(str(tmp_path / "staging"), format="parquet").to_table()
    assert table.schema.equals(PREDICTION_SCHEMA)  # score cast from float64 to the schema's float32
    assert sorted(table.column("path").to_pylist()) == sorted(f"/images/{index}.png" for index in range(12))
