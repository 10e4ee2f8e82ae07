"""The trend report (`imgcls report`): run records written with the real models, a real review file
and real images, on a local folder and on the moto S3 endpoint. No Ray, no TensorFlow."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_BUCKET, upload_tree
from PIL import Image

from imgcls import cli, report
from imgcls.config import ReportConfig
from imgcls.errors import DataError
from imgcls.monitoring.summaries import DriftReport, DriftSignal, Quantiles, ReviewRecord, RunMonitoring
from imgcls.platform import output_runs, storage
from imgcls.platform.output_runs import ChunkRecord, RunRecord

OLD_RUN = "20250301T020000000Z-0000a001"
NO_REFERENCE_RUN = "20250302T020000000Z-0000a002"
FAILED_RUN = "20250302T140000000Z-0000a003"
INSUFFICIENT_RUN = "20250303T020000000Z-0000a004"
OK_RUN = "20250304T020000000Z-0000a005"
ABANDONED_RUN = "20250304T150000000Z-0000a006"
DRIFT_RUN = "20250305T020000000Z-0000a007"
ALL_RUNS = [OLD_RUN, NO_REFERENCE_RUN, FAILED_RUN, INSUFFICIENT_RUN, OK_RUN, ABANDONED_RUN, DRIFT_RUN]
FIGURES = ["images_per_night.png", "class_shares.png", "scores_and_unknowns.png", "drift.png", "error_share.png"]
# The review file's rows (rank, image name, label, margin), out of rank order on purpose.
REVIEW_ROWS = [
    (3, "blue.png", "sky", 0.08),
    (1, "red.png", "sunset", 0.01),
    (2, "missing.png", "sky", 0.05),
    (5, "not_an_image.png", "forest", 0.12),
    (4, "wide.jpg", "forest", 0.10),
    (6, "transparent.png", "sunset", 0.2),
]
UNREADABLE = {"missing.png", "not_an_image.png"}


def _quantiles(mean: float, spread: float = 0.1) -> Quantiles:
    return Quantiles(mean=mean, p05=mean - 2 * spread, p25=mean - spread, p50=mean, p75=mean + spread, p95=mean + 2 * spread)


def _monitoring(images: int, errored: int, shares: dict[str, float], score: float, unknown: float | None) -> dict:
    return RunMonitoring(
        images=images, errored=errored, errored_share=errored / (images + errored), class_shares=shares,
        min_score=None if unknown is None else 0.5, below_min_score_share=unknown, score=_quantiles(score, 0.05),
        margin=_quantiles(score / 2), entropy=_quantiles(0.6),
        image_statistics={name: _quantiles(value) for name, value in
                          (("brightness", 0.5), ("contrast", 0.2), ("colourfulness", 0.3), ("width", 64.0), ("height", 48.0))},
        seconds=0.4,
    ).model_dump()  # fmt: skip


def _drift(status: str, score: float | None = None, images: int = 500) -> dict:
    signals = {}
    if score is not None:
        signals = {"brightness": DriftSignal(statistic="jensen_shannon", value=0.02 * score, threshold=0.02,
                                             p_value=0.001 if score > 1 else 0.4, detected=score > 1)}  # fmt: skip
    return DriftReport(
        status=status, detected=status == "drift", score=score, images=images, min_images=200, false_alarm_rate=0.01,
        reference_images=None if status == "no_reference" else 1200,
        reference_source=None if status == "no_reference" else "validation split", signals=signals,
        message={"insufficient_images": "150 images, fewer than min_images 200", "no_reference": "the artifact has no reference profile"}.get(status),
    ).model_dump()  # fmt: skip


def _record(run_id: str, output_uri: str, status: str = "succeeded", classified: int | None = None,
            errored: int | None = None, **sections) -> RunRecord:  # fmt: skip
    started = f"{run_id[0:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}+00:00"
    return RunRecord(
        run_id=run_id, status=status, input="s3://photos/incoming", output=output_uri, model="models/sky",
        model_version="sky-1a2b3c", started=started, classified=classified, errored=errored,
        finished=None if status != "succeeded" else started, images_listed=(classified or 0) + (errored or 0),
        **sections,
    )  # fmt: skip


def write_images(images_root: Path) -> None:
    images_root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images_root / "red.png")
    Image.new("RGB", (24, 24), (30, 60, 220)).save(images_root / "blue.png")
    gradient = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (20, 1))
    Image.fromarray(np.stack([gradient, gradient // 2, 255 - gradient], axis=-1)).save(images_root / "wide.jpg", quality=90)
    Image.new("RGBA", (32, 32), (0, 128, 0, 0)).save(images_root / "transparent.png")
    (images_root / "not_an_image.png").write_bytes(b"these bytes are no image")


def write_review_file(location: Path, images_uri: str) -> None:
    rows = REVIEW_ROWS
    table = pa.table({
        "rank": pa.array([rank for rank, *_ in rows], pa.int32()),
        "path": pa.array([f"{images_uri}/{name}" for _, name, _, _ in rows], pa.string()),
        "label": pa.array([label for _, _, label, _ in rows], pa.string()),
        "score": pa.array([0.5 + margin for *_, margin in rows], pa.float32()),
        "margin": pa.array([margin for *_, margin in rows], pa.float32()),
        "entropy": pa.array([1.0 - margin for *_, margin in rows], pa.float32()),
        "top_k_labels": pa.array([[label, "sky"] for _, _, label, _ in rows], pa.list_(pa.string())),
        "top_k_scores": pa.array([[0.5 + margin, 0.5 - margin] for *_, margin in rows], pa.list_(pa.float32())),
        "labels": pa.array([None] * len(rows), pa.list_(pa.string())),
        "model_version": pa.array(["sky-1a2b3c"] * len(rows), pa.string()),
    })  # fmt: skip
    location.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, location)


def write_output(output_root: Path, output_uri: str, images_uri: str) -> None:
    """Seven runs over five nights: one from before monitoring, one failed and one abandoned, four
    monitored with each drift status, the last with a review file; plus two files under _runs that
    are not run records."""
    output = storage.resolve(str(output_root))
    shares = {"sky": 0.5, "sunset": 0.3, "forest": 0.2}
    records = [
        _record(OLD_RUN, output_uri, classified=980, errored=20),
        _record(NO_REFERENCE_RUN, output_uri, classified=495, errored=5,
                monitoring=_monitoring(495, 5, shares, 0.82, 0.04), drift=_drift("no_reference", images=495)),
        _record(FAILED_RUN, output_uri, status="failed", error="JobStalledError: no image completed for 600 s",
                chunks=[ChunkRecord(index=0, rows=300, files=[], committed="2025-03-02T14:10:00+00:00")]),
        _record(INSUFFICIENT_RUN, output_uri, classified=150, errored=0,
                monitoring=_monitoring(150, 0, {"sky": 0.6, "sunset": 0.4}, 0.80, 0.05),
                drift=_drift("insufficient_images", images=150)),
        _record(OK_RUN, output_uri, classified=610, errored=12,
                monitoring=_monitoring(610, 12, {"sky": 0.45, "sunset": 0.3, "forest": 0.25}, 0.79, 0.06),
                drift=_drift("ok", score=0.42, images=610)),
        _record(ABANDONED_RUN, output_uri, status="abandoned"),
        _record(DRIFT_RUN, output_uri, classified=700, errored=70,
                monitoring=_monitoring(700, 70, {"sky": 0.2, "sunset": 0.1, "forest": 0.7}, 0.61, 0.21),
                drift=_drift("drift", score=2.5, images=700),
                review=ReviewRecord(file=f"{output_uri}/_review/{DRIFT_RUN}.parquet", rows=len(REVIEW_ROWS),
                                    ranked_by="margin").model_dump()),
    ]  # fmt: skip
    for record in records:
        output_runs.write_run_record(output, record)
    (output_root / "_runs" / "broken.json").write_text("{not json")
    (output_root / "_runs" / "someone_elses.json").write_text('{"hello": "world"}')
    write_review_file(output_root / "_review" / f"{DRIFT_RUN}.parquet", images_uri)


def assert_png(data: bytes, name: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG", name
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
    assert 300 <= width <= 4000 and 150 <= height <= 4000, f"{name}: {width}x{height}"
    return width, height


def assert_report(markdown: str, output_uri: str) -> None:
    assert markdown.startswith(f"# Trend report: {output_uri}\n")
    assert "7 run(s) from 2025-03-01 02:00 to 2025-03-05 02:00 UTC, 4 with monitoring" in markdown
    assert "2 file(s) under _runs/ are not run records" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| 2025")]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == list(reversed(ALL_RUNS))  # newest first
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table}
    assert rows[DRIFT_RUN] == f"| {DRIFT_RUN} | 2025-03-05 02:00 | succeeded | 700 | 9.1% | 0.610 | **drift** 2.50 |"
    assert rows[OK_RUN].endswith("| ok 0.42 |")
    assert rows[INSUFFICIENT_RUN].endswith("| insufficient images |")
    assert rows[NO_REFERENCE_RUN].endswith("| no reference |")
    assert rows[OLD_RUN] == f"| {OLD_RUN} | 2025-03-01 02:00 | succeeded | 980 | 2.0% | — | — |"
    assert rows[FAILED_RUN] == f"| {FAILED_RUN} | 2025-03-02 14:00 | failed | — | — | — | — |"
    for figure in [*FIGURES, "contact_sheet.png"]:
        assert f"]({figure})" in markdown, figure
    assert "2 run(s) not tested, drawn as hollow markers at zero: insufficient images (1), no reference (1)." in markdown
    assert f"The 6 least certain image(s) of run {DRIFT_RUN} (ranked by margin; 6 in its review file" in markdown
    sheet_rows = [line for line in markdown.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5 |", "| 6 |"))]
    assert [int(line.split(" | ")[0].lstrip("| ")) for line in sheet_rows] == [1, 2, 3, 4, 5, 6]
    for line in sheet_rows:
        name = line.rsplit("/", 1)[-1].split(" ")[0]
        assert line.endswith("(unreadable) |") == (name in UNREADABLE), line
    assert sheet_rows[0].startswith("| 1 | sunset | 0.010 | ")
    notes = markdown.split("## Runs without monitoring", 1)[1]
    assert f"- {OLD_RUN} (2025-03-01 02:00 UTC): written by an imgcls before monitoring" in notes
    assert f"- {FAILED_RUN} (2025-03-02 14:00 UTC): the run did not finish (failed): JobStalledError" in notes
    assert f"- {ABANDONED_RUN} (2025-03-04 15:00 UTC): the run did not finish (abandoned)" in notes


def test_report_of_a_local_output(tmp_path, caplog):
    output_root, images_root = tmp_path / "predictions", tmp_path / "images"
    write_images(images_root)
    write_output(output_root, str(output_root), str(images_root))
    with caplog.at_level(logging.WARNING):
        summary = report.run(ReportConfig(output=str(output_root)))
    report_dir = output_root / "_report"
    assert summary.report_uri == str(report_dir / "report.md") and summary.runs == 7
    assert summary.figures == [str(report_dir / name) for name in [*FIGURES, "contact_sheet.png"]]
    assert_report((report_dir / "report.md").read_text(), str(output_root))
    sizes = {path.name: assert_png(path.read_bytes(), path.name) for path in sorted(report_dir.glob("*.png"))}
    assert sorted(sizes) == sorted([*FIGURES, "contact_sheet.png"])
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "broken.json out of the report" in warnings and "someone_elses.json out of the report" in warnings
    assert "missing.png is shown as unreadable" in warnings and "not_an_image.png is shown as unreadable" in warnings


def test_report_over_old_records_only_draws_what_they_have(tmp_path):
    output = storage.resolve(str(tmp_path / "predictions"))
    output_runs.write_run_record(output, _record(OLD_RUN, output.uri, classified=50, errored=1))
    output_runs.write_run_record(output, _record(FAILED_RUN, output.uri, status="failed"))
    report_dir = tmp_path / "elsewhere" / "report"
    summary = report.run(ReportConfig(output=output.uri, report_dir=str(report_dir), contact_sheet_images=0))
    assert summary.figures == [str(report_dir / "images_per_night.png"), str(report_dir / "error_share.png")]
    markdown = (report_dir / "report.md").read_text()
    assert "No run has a monitoring section yet" in markdown and "No run has a drift section yet" in markdown
    assert "The contact sheet is turned off (contact_sheet_images=0)." in markdown
    assert "](class_shares.png)" not in markdown and "](images_per_night.png)" in markdown
    for name in ("images_per_night.png", "error_share.png"):
        assert_png((report_dir / name).read_bytes(), name)


def test_report_of_an_output_on_s3(s3_endpoint, tmp_path):
    import boto3

    prefix = "trend-report"
    output_uri, images_uri = f"s3://{TEST_BUCKET}/{prefix}/predictions", f"s3://{TEST_BUCKET}/{prefix}/images"
    write_images(tmp_path / "images")
    write_output(tmp_path / "predictions", output_uri, images_uri)
    upload_tree(tmp_path / "images", TEST_BUCKET, f"{prefix}/images")
    upload_tree(tmp_path / "predictions", TEST_BUCKET, f"{prefix}/predictions")
    summary = report.run(ReportConfig(output=output_uri))
    assert summary.report_uri == f"{output_uri}/_report/report.md" and summary.runs == 7
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{prefix}/predictions/_report/")["Contents"]}
    assert keys == {f"{prefix}/predictions/_report/{name}" for name in ["report.md", *FIGURES, "contact_sheet.png"]}
    markdown = client.get_object(Bucket=TEST_BUCKET, Key=f"{prefix}/predictions/_report/report.md")["Body"].read().decode()
    assert_report(markdown, output_uri)
    for name in [*FIGURES, "contact_sheet.png"]:
        assert_png(client.get_object(Bucket=TEST_BUCKET, Key=f"{prefix}/predictions/_report/{name}")["Body"].read(), name)


def test_review_file_found_under_the_output_when_its_recorded_uri_is_gone(tmp_path):
    """An output copied elsewhere keeps its records' old URIs: the review file is read from its place
    under the output the report was given."""
    output_root, images_root = tmp_path / "copy", tmp_path / "images"
    write_images(images_root)
    write_output(output_root, str(tmp_path / "original"), str(images_root))
    summary = report.run(ReportConfig(output=str(output_root)))
    assert summary.figures[-1] == str(output_root / "_report" / "contact_sheet.png")


def test_report_of_an_output_without_run_records_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataError, match=r"No run records under .*_runs: the report reads what `imgcls predict` wrote"):
            report.run(ReportConfig(output=str(output)))
    (tmp_path / "empty" / "_runs").mkdir()
    (tmp_path / "empty" / "_runs" / "junk.json").write_text("[]")
    with pytest.raises(DataError, match=r"\(1 file\(s\) there are not run records imgcls can read\)"):
        report.run(ReportConfig(output=str(tmp_path / "empty")))


def test_cli_report_exit_codes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--output", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("imgcls report: error: No run records under") and "Traceback" not in error

    output = tmp_path / "predictions"
    assert cli.main(["report", "--output", str(output), "--report-dir", str(output / "reports")]) == 2
    assert "report_dir" in capsys.readouterr().err

    output_runs.write_run_record(storage.resolve(str(output)), _record(OLD_RUN, str(output), classified=5, errored=0))
    assert cli.main(["report", "--output", str(output), "--set", "contact_sheet_images=0"]) == 0
    assert capsys.readouterr().out.strip() == f"1 run records read, 2 figures -> {output / '_report' / 'report.md'}"


def test_the_report_folder_is_not_foreign_to_the_next_predict_run(tmp_path):
    output = storage.resolve(str(tmp_path / "predictions"))
    output_runs.write_run_record(output, _record(OLD_RUN, output.uri, classified=5, errored=0))
    report.run(ReportConfig(output=output.uri))
    assert output_runs.survey(output).foreign == []


def test_a_section_that_does_not_validate_is_left_out_and_its_run_kept(tmp_path, caplog):
    from imgcls.reporting.run_history import read_runs

    output = storage.resolve(str(tmp_path / "predictions"))
    section = _monitoring(10, 1, {"sky": 1.0}, 0.9, None)
    output_runs.write_run_record(output, _record(OK_RUN, output.uri, monitoring=section))
    values = json.loads((tmp_path / "predictions" / "_runs" / f"{OK_RUN}.json").read_text())
    values["drift"] = {"status": "sideways"}
    (tmp_path / "predictions" / "_runs" / f"{OK_RUN}.json").write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING):
        (run,), left_out = read_runs(output)
    assert left_out == 0 and run.monitoring == RunMonitoring.model_validate(section) and run.drift is None
    assert f"run {OK_RUN}: its drift section is left out" in caplog.text


def test_the_report_job_entrypoint(tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    output = storage.resolve(str(tmp_path / "predictions"))
    output_runs.write_run_record(output, _record(OLD_RUN, output.uri, classified=5, errored=0))
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "report.py"), "--output", output.uri],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().endswith(f"-> {tmp_path / 'predictions' / '_report' / 'report.md'}")
    missing = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "report.py"), "--output", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "No run records under" in missing.stderr and "Traceback" not in missing.stderr
