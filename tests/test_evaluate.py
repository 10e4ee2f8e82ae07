"""The evaluate job end to end through the CLI, against a real artifact and real Ray."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
from conftest import REPO_ROOT
from PIL import Image


def test_evaluate_writes_consistent_metrics_figures_and_report(ray_session, trained_one_worker, pattern_holdout, tmp_path):
    result, _ = trained_one_worker
    data = tmp_path / "labelled"
    shutil.copytree(pattern_holdout, data)
    (data / "vertical" / "broken.png").write_bytes(b"not a png")
    output = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--model", result.artifact_uri,
         "--data", str(data), "--output", str(output), "--set", "top_k=1"],
        env={**os.environ, "RAY_ADDRESS": ray_session}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    matrix = metrics["confusion_matrix"]["matrix"]
    assert metrics["images"] == 20 and metrics["unreadable_images"] == 1
    assert sum(map(sum, matrix)) == 20
    assert metrics["accuracy"] == (matrix[0][0] + matrix[1][1]) / 20
    assert metrics["top_1_accuracy"] == metrics["accuracy"]
    assert metrics["per_class"]["horizontal"]["support"] == 10
    assert 0.0 <= metrics["calibration"]["expected_calibration_error"] <= 1.0
    for figure in ("confusion_matrix.png", "reliability.png"):
        with Image.open(output / figure) as image:
            image.verify()
            assert image.format == "PNG"
    mistakes = pq.read_table(output / "mistakes.parquet")
    assert mistakes.column_names == ["path", "true", "predicted", "score"]
    assert mistakes.num_rows == 20 - round(metrics["accuracy"] * 20)
    assert pq.read_table(output / "skipped_images.parquet").column("path").to_pylist()[0].endswith("broken.png")
    report = (output / "report.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in report and "| horizontal |" in report


def test_evaluate_refuses_classes_the_model_does_not_know(ray_session, trained_one_worker, tmp_path):
    result, _ = trained_one_worker
    for name in ("horizontal", "giraffe"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "data" / name / "a.png")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--model", result.artifact_uri,
         "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out")],
        env={**os.environ, "RAY_ADDRESS": ray_session}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2 and "['giraffe']" in completed.stderr and "Traceback" not in completed.stderr
