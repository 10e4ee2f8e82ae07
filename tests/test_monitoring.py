"""Monitoring of bulk runs with a real trained model and real images, in the job's own process:
the reference profile, drift verdicts on in-distribution and shifted inputs, too-small runs,
--fail-on-drift, margin and entropy against hand computation, the review queue, and artifacts
without a profile."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from monitoring_factory import (
    CLASS_NAMES,
    labelled_paths,
    train_monitored_artifact,
    write_inverted,
    write_manifest,
    write_other_domain,
)  # fmt: skip

from imgcls import cli, predict
from imgcls.config import PredictConfig
from imgcls.monitoring.observations import entropies, margins
from imgcls.monitoring.profile import PROFILE_ARRAYS, PROFILE_FILE, read_profile


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> dict:
    return train_monitored_artifact(tmp_path_factory.mktemp("monitored"))


def run_predict(model, input_uri, output, **settings):
    config = PredictConfig(model=str(model), input=str(input_uri), output=str(output), placement="driver", **settings)
    summary = predict.run(config)
    (record_file,) = [path for path in (output / "_runs").glob("*.json") if summary.run_id in path.name]
    return summary, json.loads(record_file.read_text())


def test_margin_and_entropy_by_hand():
    # Binary: [1 - p, p]; margin |2p - 1|, entropy in bits (log base 2 = log 2 classes).
    binary = np.array([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    assert margins(binary) == pytest.approx([0.6, 0.0, 1.0])
    hand = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    assert entropies(binary) == pytest.approx([hand, 1.0, 0.0])
    multiclass = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.45, 0.45]])
    assert margins(multiclass) == pytest.approx([0.5, 0.0, 0.0])
    hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert entropies(multiclass) == pytest.approx([hand, 1.0, -(0.1 * math.log(0.1) + 0.9 * math.log(0.45)) / math.log(3)])
    # Multi-label: the mean binary entropy of the sigmoids, 1 when each is at 0.5.
    assert entropies(np.array([[0.5, 0.5], [1.0, 0.0]]), multilabel=True) == pytest.approx([1.0, 0.0])


def test_profile_is_in_the_artifact_and_describes_the_validation_images(monitored):
    model = monitored["model"]
    assert (model / PROFILE_FILE).is_file() and (model / PROFILE_ARRAYS).is_file()
    profile, arrays = read_profile(str(model))
    assert profile.source == "validation" and profile.images == 150 and profile.class_names == CLASS_NAMES
    assert sum(profile.class_counts) == 150
    assert profile.scalars["width"].quantiles.p50 == 16 and profile.scalars["height"].quantiles.p50 == 16
    assert arrays.projection.shape == (128, 32) and arrays.covariance.shape == (32, 32)
    assert sum(profile.scalars["brightness"].counts) == 150


def test_parquet_margin_and_entropy_match_the_rows_probabilities(monitored, tmp_path):
    output = tmp_path / "out"
    summary, record = run_predict(monitored["model"], monitored["holdout"], output, top_k=3)
    table = pads.dataset(str(output), format="parquet").to_table()
    assert table.num_rows == 240 and summary.classified == 240
    probabilities = np.array(table.column("top_k_scores").to_pylist(), dtype=np.float64)  # all 3 classes
    margin = table.column("margin").to_numpy()
    assert margin == pytest.approx(probabilities[:, 0] - probabilities[:, 1], abs=1e-6)
    by_hand = [-sum(p * math.log(p) for p in row if p > 0) / math.log(3) for row in probabilities]
    assert table.column("entropy").to_numpy() == pytest.approx(by_hand, abs=1e-5)
    monitoring = record["monitoring"]
    assert monitoring["images"] == 240 and monitoring["errored"] == 0
    assert sum(monitoring["class_shares"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(monitoring["image_statistics"]) == {"brightness", "contrast", "colourfulness", "width", "height"}
    assert record["drift"]["status"] == "ok", record["drift"]
    assert not [name for name in table.column_names if name.startswith("_")]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resampled_halves_of_a_held_out_folder_are_not_flagged(monitored, tmp_path, seed):
    paths, _ = labelled_paths(monitored["holdout"])
    half = sorted(np.random.default_rng(seed).choice(paths, size=len(paths) // 2, replace=False).tolist())
    manifest = write_manifest(tmp_path / "half.csv", half)
    summary, record = run_predict(monitored["model"], manifest, tmp_path / "out")
    drift = record["drift"]
    assert drift["status"] == "ok" and not drift["detected"] and drift["images"] == 120, drift
    assert drift["score"] < drift["threshold"]
    assert set(drift["signals"]) >= {"class", "score", "margin", "brightness", "embedding"}
    assert summary.drift.detected is False


def shifted_inputs(monitored, tmp_path) -> dict[str, list[str]]:
    paths, labels = labelled_paths(monitored["holdout"])
    return {
        "inverted colours": write_inverted(paths[::2], tmp_path / "inverted"),
        "another domain": write_other_domain(tmp_path / "digits", 120),
        "two of three classes": [path for path, label in zip(paths, labels) if label != 1][::1][:120],
    }


@pytest.mark.parametrize("kind", ["inverted colours", "another domain", "two of three classes"])
def test_clearly_shifted_inputs_are_flagged(monitored, tmp_path, kind):
    manifest = write_manifest(tmp_path / "shifted.csv", shifted_inputs(monitored, tmp_path)[kind])
    _, record = run_predict(monitored["model"], manifest, tmp_path / "out")
    drift = record["drift"]
    assert drift["status"] == "drift" and drift["detected"] and drift["score"] > drift["threshold"], drift
    flagged = {name for name, signal in drift["signals"].items() if signal["detected"]}
    if kind == "two of three classes":
        assert "class" in flagged
    if kind == "inverted colours":
        assert "brightness" in flagged


def test_a_tiny_run_reports_insufficient_images(monitored, tmp_path):
    paths, _ = labelled_paths(monitored["holdout"])
    _, record = run_predict(monitored["model"], write_manifest(tmp_path / "few.csv", paths[:30]), tmp_path / "out")
    assert record["drift"]["status"] == "insufficient_images" and record["drift"]["detected"] is False
    assert record["drift"]["images"] == 30 and record["drift"]["min_images"] == 100 and record["drift"]["signals"] == {}
    assert record["monitoring"]["images"] == 30


def test_fail_on_drift_exits_3_with_the_output_committed(monitored, tmp_path, capsys):
    paths, _ = labelled_paths(monitored["holdout"])
    manifest = write_manifest(tmp_path / "inverted.csv", write_inverted(paths[::2], tmp_path / "inverted"))
    output = tmp_path / "out"
    code = cli.main(["predict", "--model", str(monitored["model"]), "--input", str(manifest), "--output", str(output),
                     "--fail-on-drift", "--set", "placement=driver"])  # fmt: skip
    assert code == 3
    assert "drift" in capsys.readouterr().err
    assert pads.dataset(str(output), format="parquet").count_rows() == 120
    (record,) = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    assert record["status"] == "succeeded" and record["drift"]["detected"] is True
    # The same run in distribution exits 0.
    clean = write_manifest(tmp_path / "clean.csv", paths[::2])
    assert cli.main(["predict", "--model", str(monitored["model"]), "--input", str(clean), "--output",
                     str(tmp_path / "clean_out"), "--fail-on-drift", "--set", "placement=driver"]) == 0  # fmt: skip


def test_review_writes_exactly_the_n_least_certain_rows_and_copies_them_once(monitored, tmp_path):
    paths, _ = labelled_paths(monitored["holdout"])
    images = paths[:60] + write_other_domain(tmp_path / "digits", 40)  # some the model is unsure of
    manifest = write_manifest(tmp_path / "mixed.csv", images)
    output, folder = tmp_path / "out", tmp_path / "to_label"
    summary, record = run_predict(monitored["model"], manifest, output, review=7, review_folder=str(folder))
    review = pq.read_table(output / "_review" / f"{summary.run_id}.parquet")
    assert record["review"]["rows"] == 7 and record["review"]["file"] == str(output / "_review" / f"{summary.run_id}.parquet")
    everything = pads.dataset(str(output), format="parquet").to_table()
    order = pc.sort_indices(everything, sort_keys=[("margin", "ascending"), ("entropy", "descending"), ("path", "ascending")])
    expected = everything.take(order[:7])
    assert review.column("path").to_pylist() == expected.column("path").to_pylist()
    assert review.column("rank").to_pylist() == list(range(1, 8))
    assert review.column("margin").to_pylist() == expected.column("margin").to_pylist()
    assert max(review.column("margin").to_pylist()) <= min(everything.take(order[7:]).column("margin").to_pylist())
    assert review.column("top_k_labels").to_pylist() == expected.column("top_k_labels").to_pylist()
    copies = sorted(path for path in folder.rglob("*.png"))
    assert len(copies) == 7 and record["review"]["copied"] == 7
    assert {path.parent.name for path in copies} <= set(CLASS_NAMES)
    # A rerun over new images with the same folder never overwrites or doubles a copy.
    _, again = run_predict(monitored["model"], manifest, tmp_path / "out2", review=7, review_folder=str(folder))
    assert again["review"]["copied"] == 0 and again["review"]["copy_skipped"] == 7
    assert len(list(folder.rglob("*.png"))) == 7


def test_review_folder_inside_the_input_is_refused(monitored, tmp_path):
    code = cli.main(["predict", "--model", str(monitored["model"]), "--input", str(monitored["holdout"]),
                     "--output", str(tmp_path / "out"), "--review", "3", "--review-folder",
                     str(monitored["holdout"] / "to_label")])  # fmt: skip
    assert code == 2 and not (monitored["holdout"] / "to_label").exists()


def test_an_artifact_without_a_profile_predicts_and_says_it_has_no_reference(tiny_artifact, pattern_holdout, tmp_path):
    output = tmp_path / "out"
    summary, record = run_predict(tiny_artifact, pattern_holdout, output)
    assert summary.classified == 20 and record["drift"]["status"] == "no_reference"
    assert "no reference profile" in record["drift"]["message"]
    assert record["monitoring"]["images"] == 20
    table = pads.dataset(str(output), format="parquet").to_table()
    assert table.column("margin").null_count == 0 and table.column("entropy").null_count == 0


def test_an_unreadable_profile_is_said_once_and_the_run_goes_on(monitored, tmp_path, caplog):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(monitored["model"], model)
    (model / PROFILE_ARRAYS).write_bytes(b"not an npz")
    paths, _ = labelled_paths(monitored["holdout"])
    _, record = run_predict(model, write_manifest(tmp_path / "m.csv", paths[:20]), tmp_path / "out")
    assert record["drift"]["status"] == "no_reference"
    assert "reference profile" in caplog.text and "unreadable" in caplog.text


def test_without_a_validation_split_a_slice_of_train_is_held_out_for_the_profile(pattern_dataset, caplog):
    from conftest import tiny_job_overrides

    from imgcls import train
    from imgcls.config import load_job_config
    from imgcls.data.listing import list_labelled

    images = list_labelled(str(pattern_dataset))
    config = load_job_config(None, [*tiny_job_overrides(pattern_dataset, "/tmp/unused"), "data.val_fraction=0"])
    kept, held_out, source = train._profile_images(config, images, None)
    assert source == "train_holdout" and len(held_out.paths) == 10 and len(kept.paths) == 86
    assert not set(kept.paths) & set(held_out.paths) and {*kept.paths, *held_out.paths} == set(images.paths)
    assert "held out of training for the reference profile" in caplog.text
    off = load_job_config(None, [*tiny_job_overrides(pattern_dataset, "/tmp/unused"), "data.val_fraction=0",
                                 "data.profile_holdout_fraction=0"])  # fmt: skip
    assert train._profile_images(off, images, None) == (images, None, "validation")


def nightly_runs(monitored, tmp_path, output: str) -> None:
    """Three nights into one output: half the held-out images, the other half arriving, then a night of
    colour-inverted images (drift), each with a review queue."""
    paths, _ = labelled_paths(monitored["holdout"])
    nights = [paths[::2], paths[1::2], write_inverted(paths[:120], tmp_path / "inverted")]
    for night, images in enumerate(nights):
        manifest = write_manifest(tmp_path / f"night{night}.csv", images)
        predict.run(PredictConfig(model=str(monitored["model"]), input=str(manifest), output=output,
                                  placement="driver", review=12))  # fmt: skip


def check_report(summary, read_bytes) -> None:
    import io

    from PIL import Image

    assert summary.runs == 3
    text = read_bytes("report.md").decode()
    for figure in ("images_per_night.png", "class_shares.png", "scores_and_unknowns.png", "drift.png",
                   "error_share.png", "contact_sheet.png"):  # fmt: skip
        assert f"({figure})" in text
        with Image.open(io.BytesIO(read_bytes(figure))) as image:
            image.verify()
        assert Image.open(io.BytesIO(read_bytes(figure))).size[0] > 200
    assert text.count("| drift") >= 1 and "| ok" in text, text


def test_the_trend_report_builds_from_several_real_runs(monitored, tmp_path):
    from imgcls import report
    from imgcls.config import ReportConfig

    output = tmp_path / "predictions"
    nightly_runs(monitored, tmp_path, str(output))
    summary = report.run(ReportConfig(output=str(output)))
    check_report(summary, lambda name: (output / "_report" / name).read_bytes())
    # The report's folder and the review queues are imgcls's own: the next night's run goes on.
    paths, _ = labelled_paths(monitored["holdout"])
    extra = run_predict(monitored["model"], write_manifest(tmp_path / "more.csv", paths[:5]), output)[0]
    assert extra.classified == 0 and extra.already_done == 5


def test_the_trend_report_builds_from_several_real_runs_on_s3(monitored, s3_endpoint, tmp_path):
    import boto3
    from conftest import TEST_BUCKET

    from imgcls import report
    from imgcls.config import ReportConfig

    output = f"s3://{TEST_BUCKET}/monitoring/predictions"
    nightly_runs(monitored, tmp_path, output)
    summary = report.run(ReportConfig(output=output))
    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def read(name: str) -> bytes:
        return client.get_object(Bucket=TEST_BUCKET, Key=f"monitoring/predictions/_report/{name}")["Body"].read()

    check_report(summary, read)
    records = client.list_objects_v2(Bucket=TEST_BUCKET, Prefix="monitoring/predictions/_review/")["Contents"]
    assert len(records) == 3


def test_monitoring_is_the_same_from_the_actor_pool(ray_session, monitored, tmp_path):
    """Ray Data decode tasks and a model actor carry the monitoring columns to the job's process."""
    in_process, _ = run_predict(monitored["model"], monitored["holdout"], tmp_path / "driver")
    config = PredictConfig(model=str(monitored["model"]), input=str(monitored["holdout"]), output=str(tmp_path / "pool"),
                           placement="actor_pool", num_actors=1, review=5)  # fmt: skip
    pooled = predict.run(config)
    (record,) = [json.loads(path.read_text()) for path in (tmp_path / "pool" / "_runs").glob("*.json")]
    assert record["model_placement"] == "actor_pool" and record["monitoring"]["images"] == 240
    assert pooled.drift.status == "ok" and set(pooled.drift.signals) == set(in_process.drift.signals)
    for name, signal in pooled.drift.signals.items():  # the same images, decoded and observed the same way
        assert signal.value == pytest.approx(in_process.drift.signals[name].value, abs=1e-4), name
    assert record["review"]["rows"] == 5
    table = pads.dataset(str(tmp_path / "pool"), format="parquet").to_table()
    assert table.column("margin").null_count == 0 and not [name for name in table.column_names if name.startswith("_")]
