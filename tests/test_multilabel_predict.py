"""Multi-label prediction through the real CLI, in the job's own process: the `labels` column against
probabilities recomputed from the Keras model, threshold overrides and their precedence, bad
overrides (exit 2), single-label rows unchanged but for `labels`, and reruns into an output written
before `labels` existed."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import IMAGE_SIZE
from multilabel_factory import CLASS_NAMES, THRESHOLDS, probabilities_from_keras, write_colour_images
from PIL import Image

from imgcls import cli
from imgcls.inference.predictor import PREDICTION_SCHEMA

# The schema before `labels`: every column keeps its name, type and position.
PREVIOUS_COLUMNS = [
    ("path", pa.string()), ("label", pa.string()), ("score", pa.float32()), ("top_k_labels", pa.list_(pa.string())),
    ("top_k_scores", pa.list_(pa.float32())), ("model_version", pa.string()), ("error", pa.string()),
]  # fmt: skip


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour_images") / "images"
    write_colour_images(root, 24, seed=5)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def keras_probabilities(colour_artifact, colour_images) -> dict[str, np.ndarray]:
    paths = sorted(str(path) for path in colour_images.glob("image_*.png"))
    return dict(zip(paths, probabilities_from_keras(colour_artifact, paths)))


def predict(model: str, images, output, *arguments: str) -> int:
    return cli.main(["predict", "--model", model, "--input", str(images), "--output", str(output), *arguments])


def rows_by_path(output) -> dict[str, dict]:
    return {row["path"]: row for row in pads.dataset(str(output), format="parquet").to_table().to_pylist()}


def expected_labels(probabilities: np.ndarray, thresholds: list[float]) -> list[str]:
    return [name for name, probability, threshold in zip(CLASS_NAMES, probabilities, thresholds) if float(probability) >= threshold]


def only_record(output) -> dict:
    (record,) = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
    return record


def test_labels_are_the_classes_at_or_above_the_artifacts_thresholds(colour_artifact, colour_images, keras_probabilities, tmp_path):
    output = tmp_path / "out"
    assert predict(colour_artifact, colour_images, output) == 0
    table = pads.dataset(str(output), format="parquet").to_table()
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert [(field.name, field.type) for field in table.schema][:7] == PREVIOUS_COLUMNS
    assert table.schema.names[7:] == ["labels", "margin", "entropy"]
    rows = rows_by_path(output)
    assert len(rows) == 25
    broken = rows.pop(str(colour_images / "broken.png"))
    assert broken["labels"] is None and broken["label"] is None and broken["error"]
    sizes = set()
    for path, probabilities in keras_probabilities.items():
        row = rows[path]
        assert row["labels"] == expected_labels(probabilities, THRESHOLDS), (path, probabilities)
        sizes.add(len(row["labels"]))
        # label/score: the top-1 sigmoid; top-k: the sigmoids ranked (they need not sum to 1).
        order = np.argsort(-probabilities, kind="stable")
        assert row["label"] == CLASS_NAMES[order[0]] and row["score"] == pytest.approx(probabilities[order[0]], abs=1e-5)
        assert row["top_k_labels"] == [CLASS_NAMES[index] for index in order]
        np.testing.assert_allclose(row["top_k_scores"], probabilities[order], atol=1e-5)
    assert sizes >= {0, 1, 2}  # images with no label, one, several
    assert only_record(output)["thresholds"] == dict(zip(CLASS_NAMES, THRESHOLDS))


@pytest.mark.parametrize(
    "arguments, thresholds",
    [
        (["--set", "thresholds=[0.2, 0.9, 0.5]"], [0.2, 0.9, 0.5]),
        (["--set", "thresholds={red: 0.1}"], [0.4, 0.5, 0.1]),
        (["--min-score", "0.7"], [0.7, 0.7, 0.7]),
        # min_score sets every class, then the thresholds setting the classes it names.
        (["--min-score", "0.7", "--set", "thresholds={blue: 0.05}"], [0.05, 0.7, 0.7]),
    ],
    ids=["list", "by-name", "min-score", "min-score-then-by-name"],
)
def test_threshold_overrides(colour_artifact, colour_images, keras_probabilities, tmp_path, arguments, thresholds):
    output = tmp_path / "out"
    assert predict(colour_artifact, colour_images, output, *arguments) == 0
    rows = rows_by_path(output)
    for path, probabilities in keras_probabilities.items():
        assert rows[path]["labels"] == expected_labels(probabilities, thresholds)
        if "--min-score" in arguments:  # the top-1 label keeps --min-score's meaning
            assert (rows[path]["label"] == "unknown") == (float(probabilities.max()) < 0.7)
    assert only_record(output)["thresholds"] == pytest.approx(dict(zip(CLASS_NAMES, thresholds)))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--set", "thresholds=[0.2, 0.9]"], "lists 2 value(s), but model"),
        (["--set", "thresholds={zebra: 0.2}"], "names class(es) ['zebra'] that model"),
        (["--set", "thresholds=[0.2, 1.5, 0.5]"], "each threshold must be a number between 0 and 1, got 1.5"),
        (["--set", "thresholds=high"], "must be a list with one number per class"),
        (["--min-score", "2"], "'min_score': Input should be less than or equal to 1"),
    ],
    ids=["wrong-length", "unknown-class", "out-of-range", "not-a-list", "min-score-out-of-range"],
)
def test_bad_overrides_exit_2_with_one_paragraph(colour_artifact, colour_images, tmp_path, capsys, arguments, message):
    assert predict(colour_artifact, colour_images, tmp_path / "out", *arguments) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "Traceback" not in error and "\n" not in error, error
    assert not (tmp_path / "out").exists()


def test_thresholds_for_a_single_label_model_exit_2(tiny_artifact, colour_images, tmp_path, capsys):
    assert predict(tiny_artifact, colour_images, tmp_path / "out", "--set", "thresholds=[0.5, 0.5]") == 2
    error = capsys.readouterr().err
    assert "thresholds apply to multi-label models only" in error and "binary" in error


@pytest.fixture(scope="module")
def pattern_images(tmp_path_factory):
    """Real PNGs for the tutorial CNN (noise), one unreadable."""
    root = tmp_path_factory.mktemp("pattern_images") / "images"
    root.mkdir()
    generator = np.random.default_rng(9)
    for index in range(16):
        pixels = generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"noise_{index:02d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def single_label_expected(artifact: str, paths: list[str]) -> dict[str, dict]:
    """The previous schema's columns for each image, from the Keras model itself: one sigmoid unit
    for class_names[1] (binary), top-2 of [1 - p, p]."""
    metadata = json.loads(open(f"{artifact}/metadata.json").read())
    positive = probabilities_from_keras(artifact, paths)[:, 0]
    names = metadata["class_names"]
    expected = {}
    for path, p in zip(paths, positive):
        probabilities = np.array([1 - p, p], np.float32)
        order = np.argsort(-probabilities, kind="stable")
        expected[path] = {"label": names[order[0]], "score": probabilities[order[0]],
                          "top_k_labels": [names[index] for index in order], "top_k_scores": probabilities[order],
                          "model_version": metadata["model_version"]}  # fmt: skip
    return expected


def test_single_label_rows_gain_labels_and_keep_every_other_column(tiny_artifact, pattern_images, tmp_path):
    output = tmp_path / "out"
    assert predict(tiny_artifact, pattern_images, output) == 0
    table = pads.dataset(str(output), format="parquet").to_table()
    assert [(field.name, field.type) for field in table.schema] == [
        *PREVIOUS_COLUMNS, ("labels", pa.list_(pa.string())), ("margin", pa.float32()), ("entropy", pa.float32())]  # fmt: skip
    rows = rows_by_path(output)
    paths = sorted(str(path) for path in pattern_images.glob("noise_*.png"))
    for path, expected in single_label_expected(tiny_artifact, paths).items():
        row = rows[path]
        assert (row["label"], row["top_k_labels"], row["model_version"], row["error"]) == (
            expected["label"], expected["top_k_labels"], expected["model_version"], None)  # fmt: skip
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
        np.testing.assert_allclose(row["top_k_scores"], expected["top_k_scores"], atol=1e-5)
        assert row["labels"] == [row["label"]]
    broken = rows[str(pattern_images / "broken.png")]
    assert broken["labels"] is None and broken["label"] is None and broken["error"]
    assert only_record(output)["thresholds"] is None
    # Under --min-score a row labelled `unknown` carries no labels.
    assert predict(tiny_artifact, pattern_images, tmp_path / "strict", "--min-score", "1.0") == 0
    strict = [row for row in rows_by_path(tmp_path / "strict").values() if row["error"] is None]
    assert strict and all(row["label"] == "unknown" and row["labels"] == [] for row in strict)


def test_a_rerun_into_an_output_of_the_previous_schema(tiny_artifact, pattern_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    paths = sorted(pattern_images.glob("noise_*.png"))
    for path in paths[:8]:
        shutil.copy(path, images)
    output = tmp_path / "out"
    assert predict(tiny_artifact, images, output) == 0
    # Make the committed part what an imgcls before `labels` wrote: the same file without the newer columns.
    (part,) = output.glob("run-*/chunk-*/part-*.parquet")
    old = pq.read_table(part).drop_columns(["labels", "margin", "entropy"])
    pq.write_table(old, part)
    assert [(field.name, field.type) for field in pq.read_schema(part)] == PREVIOUS_COLUMNS
    for path in paths[8:]:
        shutil.copy(path, images)
    assert predict(tiny_artifact, images, output) == 0
    records = sorted((json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")), key=lambda r: r["run_id"])
    assert [(record["already_done"], record["classified"]) for record in records] == [(0, 8), (8, 8)]
    # The earlier part got the new column (null: not recorded then), so whole-output readers see it.
    assert pq.read_schema(part).names == PREDICTION_SCHEMA.names
    for table in (pq.read_table(output), pads.dataset(str(output), format="parquet").to_table()):
        assert table.num_rows == 16 and table.column_names[-3:] == ["labels", "margin", "entropy"]
        by_path = {row["path"]: row for row in table.to_pylist()}
        assert [by_path[str(images / path.name)]["labels"] for path in paths[:8]] == [None] * 8
        assert [by_path[str(images / path.name)]["margin"] for path in paths[:8]] == [None] * 8
        assert all(by_path[str(images / path.name)]["margin"] is not None for path in paths[8:])
        assert all(by_path[str(images / path.name)]["labels"] == [by_path[str(images / path.name)]["label"]] for path in paths[8:])
    # A third run finds everything done.
    assert predict(tiny_artifact, images, output) == 0
    last = max((json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")), key=lambda r: r["run_id"])
    assert last["already_done"] == 16 and last["classified"] == 0
