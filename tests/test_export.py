"""The export job: every format, loaded by its own runtime (TensorFlow, onnxruntime, the LiteRT
interpreter), gives the artifact's class probabilities on real decoded images; the folder it writes;
S3 in and out; the model a format cannot express; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from conftest import REPO_ROOT, TEST_BUCKET, upload_tree
from image_factory import pattern_image
from PIL import Image

from imgcls import cli
from imgcls import export as export_job
from imgcls.config import DEFAULT_MAX_IMAGE_PIXELS, ExportConfig, ModelConfig
from imgcls.data.reading import decode_batch
from imgcls.inference.predictor import Predictor
from imgcls.modeling.artifact import save_artifact
from imgcls.modeling.models import create_model, create_seed_cnn

FORMATS = ("saved_model", "onnx", "litert")
# What the issue asks of every export, on real images.
TOLERANCE = 1e-4


def artifact_fields(class_names, size, channels, task, model_name):
    return {"class_names": class_names, "image_size": (size, size), "channels": channels, "task": task,
            "model_name": model_name}  # fmt: skip


def with_batch_norm_statistics(model: keras.Model, seed: int) -> keras.Model:
    """Moving statistics and scales far from BatchNormalization's initial ones, so that a graph that
    dropped or mistranslated the normalisation could not match."""
    generator = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            (width,) = layer.moving_mean.shape
            layer.moving_mean.assign(generator.normal(0.0, 0.3, width).astype(np.float32))
            layer.moving_variance.assign(generator.uniform(0.2, 3.0, width).astype(np.float32))
            layer.gamma.assign(generator.uniform(0.5, 2.0, width).astype(np.float32))
            layer.beta.assign(generator.normal(0.0, 0.5, width).astype(np.float32))
    return model


def multilabel_model(size: int, channels: int, num_classes: int) -> keras.Model:
    """A small multi-label network: per-class sigmoids, as the multi-label engineer's models end."""
    inputs = keras.Input(shape=(size, size, channels), name="image")
    features = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    features = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(features)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", name="predictions")(features)
    return keras.Model(inputs, outputs, name="multilabel_cnn")


def caffe_preprocessing_model(size: int, num_classes: int) -> keras.Model:
    """ResNet50's own preprocessing layer (RGB -> BGR, ImageNet means subtracted) in front of a small
    network: the backbone preprocessing in every format at a fraction of ResNet50's export time."""
    from imgcls.modeling.backbones import CaffePreprocessing

    inputs = keras.Input(shape=(size, size, 3), name="image")
    features = CaffePreprocessing(name="caffe_preprocessing")(inputs)
    features = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(features)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(features)
    return keras.Model(inputs, outputs, name="caffe_cnn")


def build_artifact(kind: str, destination: Path) -> str:
    """One artifact of each kind the parity tests cover, with random but fixed weights."""
    keras.utils.set_random_seed(7)
    if kind == "seed_cnn_rgb_binary":
        model = create_seed_cnn((16, 16), 3, 2)
        fields = artifact_fields(["horizontal", "vertical"], 16, 3, "binary", "seed_cnn")
    elif kind == "cnn_batch_norm_grey_multiclass":
        config = ModelConfig(name="cnn", batch_norm=True, filters=[8, 16], dense_units=[16])
        model = with_batch_norm_statistics(create_model(config, (16, 16), 1, 4), seed=3)
        fields = artifact_fields(["zero", "one", "two", "three"], 16, 1, "multiclass", "cnn")
    elif kind == "multilabel_rgb":
        model = multilabel_model(16, 3, 3)
        fields = artifact_fields(["cat", "dog", "outdoor"], 16, 3, "multilabel", "multilabel_cnn")
    elif kind == "caffe_preprocessing_rgb_multiclass":
        model = caffe_preprocessing_model(16, 3)
        fields = artifact_fields(["a", "b", "c"], 16, 3, "multiclass", "caffe_cnn")
    elif kind == "resnet50_rgb_multiclass":
        model = create_model(ModelConfig(name="ResNet50", weights="none"), (32, 32), 3, 3)
        fields = artifact_fields(["a", "b", "c"], 32, 3, "multiclass", "ResNet50")
    else:
        raise ValueError(kind)
    uri = str(destination / kind)
    save_artifact(model, fields, uri)
    return uri


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The artifacts, each built on first use, and its Predictor (the Keras model as prediction runs it)."""
    root = tmp_path_factory.mktemp("export_artifacts")
    built: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = build_artifact(kind, root)
        return built[kind]

    return get


_predictors: dict[str, Predictor] = {}


def predictor_of(model_uri: str) -> Predictor:
    if model_uri not in _predictors:
        _predictors[model_uri] = Predictor.from_artifact(model_uri)
    return _predictors[model_uri]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    """Real files of several kinds and sizes (PNG RGB and greyscale, JPEG, a larger photo-like one
    that gets resized), decoded per test exactly as prediction decodes them."""
    root = tmp_path_factory.mktemp("export_images")
    generator = np.random.default_rng(11)
    paths = []
    for index in range(3):
        path = root / f"pattern_{index}.png"
        Image.fromarray(pattern_image(index, 16, generator)).save(path)
        paths.append(path)
    noise = Image.fromarray(generator.integers(0, 256, (48, 40, 3)).astype(np.uint8))
    noise.save(root / "noise.jpg", quality=85)
    noise.convert("L").save(root / "noise_grey.png")
    gradient = np.linspace(0, 255, 64 * 80 * 3).reshape(64, 80, 3).astype(np.uint8)
    Image.fromarray(gradient).save(root / "gradient.jpg", quality=90)
    paths += [root / "noise.jpg", root / "noise_grey.png", root / "gradient.jpg"]
    return [str(path) for path in paths]


def decoded(paths: list[str], size: int, channels: int) -> np.ndarray:
    batch = decode_batch({"path": np.array(paths, dtype=object)}, (size, size), channels, DEFAULT_MAX_IMAGE_PIXELS)
    assert all(error == "" for error in batch["error"]), batch["error"]
    return batch["image"].astype(np.float32)


def run_saved_model(directory: Path, images: np.ndarray) -> np.ndarray:
    signature = tf.saved_model.load(str(directory)).signatures["serving_default"]
    return signature(image=tf.constant(images))["probabilities"].numpy()


def run_onnx(directory: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images})[0]


def run_litert(directory: Path, images: np.ndarray) -> np.ndarray:
    runner = Interpreter(model_path=str(directory / "model.tflite")).get_signature_runner("serving_default")
    return runner(image=images)["probabilities"]


RUNTIMES = {"saved_model": run_saved_model, "onnx": run_onnx, "litert": run_litert}


def export(model_uri: str, export_format: str, output, **settings) -> export_job.ExportSummary:
    return export_job.run(ExportConfig(model=model_uri, format=export_format, output=str(output), **settings))


def assert_parity(model_uri: str, export_format: str, directory: Path, image_files: list[str]) -> float:
    """The export's probabilities on the decoded files, by its own runtime, against Predictor's."""
    predictor = predictor_of(model_uri)
    metadata = predictor.metadata
    images = decoded(image_files, metadata.image_size[0], metadata.channels)
    expected = predictor.probabilities(images)
    actual = RUNTIMES[export_format](directory, images)
    assert actual.shape == expected.shape == (len(image_files), len(metadata.class_names))
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= TOLERANCE, f"{export_format}: max |difference| {difference}"
    print(f"parity {metadata.model_name} {metadata.task} {export_format}: max |difference| {difference:.2e}")
    return difference


@pytest.mark.parametrize("export_format", FORMATS)
@pytest.mark.parametrize(
    "kind", ["seed_cnn_rgb_binary", "cnn_batch_norm_grey_multiclass", "multilabel_rgb", "caffe_preprocessing_rgb_multiclass"]
)
def test_each_format_gives_the_artifacts_probabilities_on_real_images(kind, export_format, artifacts, image_files, tmp_path):
    model_uri = artifacts(kind)
    summary = export(model_uri, export_format, tmp_path / "export")
    assert summary.max_difference is not None and summary.max_difference <= TOLERANCE
    assert_parity(model_uri, export_format, tmp_path / "export", image_files)
    predictor = predictor_of(model_uri)
    probabilities = RUNTIMES[export_format](tmp_path / "export", decoded(image_files[:1], 16, predictor.metadata.channels))
    if kind == "seed_cnn_rgb_binary":  # two columns [1 - p, p] from the one sigmoid unit
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    if kind == "multilabel_rgb":  # independent sigmoids: a batch of one works too, rows need not sum to 1
        sigmoids = predictor.model.predict_on_batch(decoded(image_files[:1], 16, 3))
        np.testing.assert_allclose(probabilities, sigmoids, atol=TOLERANCE)


# ResNet50 is 94 MB and hundreds of layers: each export traces it again (about 20 s for a SavedModel,
# 35 s for ONNX and 50 s for LiteRT on 2 idle cores). ONNX, a graph translated op by op, runs in
# `make test`; SavedModel (TensorFlow itself) and LiteRT in `make test-long`. The caffe model above
# puts ResNet50's preprocessing layer through all three formats in every run.
@pytest.mark.parametrize(
    "export_format",
    ["onnx", pytest.param("saved_model", marks=pytest.mark.long), pytest.param("litert", marks=pytest.mark.long)],
)
def test_resnet50_with_its_caffe_preprocessing_exports(export_format, artifacts, image_files, tmp_path):
    """The backbone's own preprocessing (CaffePreprocessing) is inside the export. The job's own check
    is skipped here (the test checks instead, on real images)."""
    model_uri = artifacts("resnet50_rgb_multiclass")
    started = time.perf_counter()
    export(model_uri, export_format, tmp_path / export_format, verify_images=0)
    assert_parity(model_uri, export_format, tmp_path / export_format, image_files)
    print(f"ResNet50 {export_format}: export and check {time.perf_counter() - started:.1f} s")


def test_the_export_folder_holds_the_model_labels_and_metadata(artifacts, tmp_path):
    model_uri = artifacts("cnn_batch_norm_grey_multiclass")
    summary = export(model_uri, "saved_model", tmp_path / "digits" / "1")
    folder = tmp_path / "digits" / "1"
    on_disk = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert on_disk == summary.files
    assert {"saved_model.pb", "variables/variables.index", "labels.txt", "metadata.json"} <= set(on_disk)
    document = json.loads((folder / "metadata.json").read_text())
    artifact_metadata = json.loads((Path(model_uri) / "metadata.json").read_text())
    assert {key: document[key] for key in artifact_metadata} == artifact_metadata
    record = document["export"]
    assert record["format"] == "saved_model" and record["source_model_version"] == artifact_metadata["model_version"]
    assert record["input"] == {"name": "image", "shape": [None, 16, 16, 1], "dtype": "float32", "layout": "NHWC",
                               "pixels": record["input"]["pixels"]}  # fmt: skip
    assert record["output"]["name"] == "probabilities" and record["output"]["shape"] == [None, 4]
    assert record["output"]["dtype"] == "float32"
    assert set(record["versions"]) == {"keras", "tensorflow"} and record["files"] == on_disk
    assert (folder / "labels.txt").read_text().splitlines() == artifact_metadata["class_names"]
    # What TF Serving's REST API calls: serving_default, input key `image`, output key `probabilities`,
    # any batch size; `{"instances": [...]}` is a list of HxWxC images, answered row by row.
    signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
    assert signature.structured_input_signature == (
        (), {"image": tf.TensorSpec(shape=(None, 16, 16, 1), dtype=tf.float32, name="image")}
    )
    assert signature.structured_outputs == {
        "probabilities": tf.TensorSpec(shape=(None, 4), dtype=tf.float32, name="probabilities")
    }
    # Each weight is stored once (model.export() in Keras 3.15 stores each twice, keras-team/keras#23553).
    stored = sum(int(np.prod(shape)) for name, shape in tf.train.list_variables(str(folder / "variables" / "variables"))
                 if name != "_CHECKPOINTABLE_OBJECT_GRAPH")  # fmt: skip
    assert stored == predictor_of(model_uri).model.count_params()
    body = json.loads(json.dumps({"instances": np.full((2, 16, 16, 1), 128.0).tolist()}))
    predictions = signature(image=tf.constant(body["instances"], dtype=tf.float32))["probabilities"].numpy()
    assert predictions.shape == (2, 4)


def test_onnx_and_litert_name_their_input_and_output(artifacts, tmp_path):
    model_uri = artifacts("seed_cnn_rgb_binary")
    export(model_uri, "onnx", tmp_path / "onnx")
    export(model_uri, "litert", tmp_path / "litert")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(value.name, value.shape, value.type) for value in session.get_inputs()] == [
        ("image", ["batch", 16, 16, 3], "tensor(float)")
    ]
    assert [(value.name, value.shape) for value in session.get_outputs()] == [("probabilities", ["batch", 2])]
    interpreter = Interpreter(model_path=str(tmp_path / "litert" / "model.tflite"))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["probabilities"]}}
    (details,) = interpreter.get_input_details()
    assert list(details["shape_signature"]) == [-1, 16, 16, 3] and details["dtype"] == np.float32


def test_export_from_and_to_a_bucket(s3_endpoint, artifacts, image_files, tmp_path):
    model_uri = artifacts("seed_cnn_rgb_binary")
    upload_tree(Path(model_uri), TEST_BUCKET, "export-source/model")
    summary = export(f"s3://{TEST_BUCKET}/export-source/model", "saved_model", f"s3://{TEST_BUCKET}/exports/seed/1")
    assert summary.output_uri == f"s3://{TEST_BUCKET}/exports/seed/1"
    client = boto3.client("s3")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=TEST_BUCKET, Prefix="exports/seed/1/")["Contents"]]
    assert sorted(key.removeprefix("exports/seed/1/") for key in keys) == summary.files
    downloaded = tmp_path / "downloaded"
    for key in keys:
        target = downloaded / key.removeprefix("exports/seed/1/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(TEST_BUCKET, key, str(target))
    assert_parity(model_uri, "saved_model", downloaded, image_files)
    # A second export of the same format to the same prefix replaces its files.
    again = export(f"s3://{TEST_BUCKET}/export-source/model", "saved_model", f"s3://{TEST_BUCKET}/exports/seed/1")
    assert again.files == summary.files


def resizing_artifact(destination: Path, interpolation: str) -> str:
    """A model with a Resizing layer: it runs in TensorFlow and loads in Keras' safe mode, but with
    lanczos3 (the op ScaleAndTranslate) it has neither an ONNX operator nor a LiteRT built-in, and with
    bicubic tf2onnx makes a cubic Resize over NHWC axes that onnxruntime refuses to run."""
    inputs = keras.Input(shape=(16, 16, 3), name="image")
    features = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    features = keras.layers.Resizing(12, 12, interpolation=interpolation, name="shrink")(features)
    features = keras.layers.Flatten(name="flatten")(features)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(features)
    uri = str(destination / interpolation)
    save_artifact(keras.Model(inputs, outputs, name="resizing_cnn"),
                  artifact_fields(["a", "b", "c"], 16, 3, "multiclass", "resizing_cnn"), uri)  # fmt: skip
    return uri


@pytest.mark.parametrize(
    ("interpolation", "export_format", "reason"),
    [
        ("lanczos3", "onnx", "tf2onnx has no ONNX operator for the TensorFlow op ScaleAndTranslate"),
        ("lanczos3", "litert", "the TensorFlow op ScaleAndTranslate is not a LiteRT built-in operator"),
        ("bicubic", "onnx", "onnxruntime cannot run the Resize operator made of the TensorFlow op ResizeBicubic"),
    ],
)
def test_a_layer_the_format_cannot_express_exits_2_naming_it(interpolation, export_format, reason, tmp_path, capsys):
    model_uri = resizing_artifact(tmp_path, interpolation)
    output = tmp_path / "out"
    assert cli.main(["export", "--model", model_uri, "--format", export_format, "--output", str(output)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (message,) = [line for line in stderr.splitlines() if line.startswith("imgcls export: error:")]
    assert f"{export_format} cannot express layer shrink (Resizing): {reason}" in message
    assert not output.exists()


def test_the_same_model_exports_to_saved_model(tmp_path):
    model_uri = resizing_artifact(tmp_path, "lanczos3")
    assert cli.main(["export", "--model", model_uri, "--format", "saved_model", "--output", str(tmp_path / "sm")]) == 0


def test_an_output_holding_other_files_is_refused_and_left_alone(artifacts, tmp_path, capsys):
    model_uri = artifacts("seed_cnn_rgb_binary")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", str(output)]) == 2
    assert "not an imgcls export (notes.txt)" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["notes.txt"]


def test_a_re_export_replaces_its_own_files_only(artifacts, tmp_path, capsys):
    model_uri = artifacts("seed_cnn_rgb_binary")
    output = tmp_path / "out"
    export(model_uri, "onnx", output)
    # Another format in the same folder is refused: each format gets a folder of its own.
    assert cli.main(["export", "--model", model_uri, "--format", "litert", "--output", str(output)]) == 2
    assert "holds an imgcls onnx export" in capsys.readouterr().err
    # A file the earlier export listed but the new one does not write is removed; nothing else is.
    document = json.loads((output / "metadata.json").read_text())
    document["export"]["files"].append("old_model.onnx")
    (output / "metadata.json").write_text(json.dumps(document))
    (output / "old_model.onnx").write_bytes(b"an earlier export's file")
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", str(output)]) == 0
    assert sorted(path.name for path in output.iterdir()) == ["labels.txt", "metadata.json", "model.onnx"]
    # A name the metadata lists outside the folder is never deleted (a tampered metadata.json).
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's file")
    document = json.loads((output / "metadata.json").read_text())
    document["export"]["files"].append("../outside.txt")
    (output / "metadata.json").write_text(json.dumps(document))
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", str(output)]) == 0
    assert outside.read_text() == "a user's file"
    # A file it did not write stops the next re-export.
    (output / "README").write_text("someone else's")
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", str(output)]) == 2
    assert "files it did not write (README)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--format", "coreml"], "'format': Input should be 'saved_model', 'onnx' or 'litert'"),
        (["--format", "onnx", "--set", "verify_images=-1"], "'verify_images'"),
    ],
)
def test_bad_arguments_exit_2(arguments, expected, artifacts, tmp_path, capsys):
    model_uri = artifacts("seed_cnn_rgb_binary")
    assert cli.main(["export", "--model", model_uri, "--output", str(tmp_path / "out"), *arguments]) == 2
    assert expected in capsys.readouterr().err


def test_a_missing_artifact_or_bucket_exits_2(s3_endpoint, artifacts, tmp_path, capsys):
    assert cli.main(["export", "--model", str(tmp_path / "none"), "--format", "onnx", "--output", str(tmp_path / "o")]) == 2
    assert "No model artifact" in capsys.readouterr().err
    model_uri = artifacts("seed_cnn_rgb_binary")
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", "s3://no-such-bucket/x"]) == 2
    error = capsys.readouterr().err
    assert "s3://no-such-bucket/x" in error and "NoSuchBucket" in error


def run_job(*arguments: str, prelude: str = "") -> subprocess.CompletedProcess:
    if prelude:  # a fresh interpreter in which some package is made unimportable, as if not installed
        code = f"import runpy, sys; {prelude}; sys.argv[0] = 'jobs/export.py'; runpy.run_path('jobs/export.py', run_name='__main__')"
        command = [sys.executable, "-c", code, *arguments]
    else:
        command = [sys.executable, str(REPO_ROOT / "jobs" / "export.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_the_job_script_exports_and_says_so(artifacts, tmp_path):
    model_uri = artifacts("cnn_batch_norm_grey_multiclass")
    completed = run_job("--model", model_uri, "--format", "litert", "--output", str(tmp_path / "litert"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "litert").iterdir()) == ["labels.txt", "metadata.json", "model.tflite"]
    assert (tmp_path / "litert" / "labels.txt").read_text().splitlines() == ["zero", "one", "two", "three"]
    assert "as litert (3 files" in completed.stdout
    log = completed.stderr
    assert "exported litert to" in log and "max |difference| vs keras" in log
    # No converter dumps, TensorFlow start-up or interpreter chatter in a normal run.
    for chatter in ("cuda", "absl", "MLIR", "XNNPACK", "tf2onnx", "Traceback", "WARNING"):
        assert chatter not in log, log[-3000:]


@pytest.mark.parametrize(("export_format", "module"), [("litert", "ai_edge_litert"), ("onnx", "onnxruntime")])
def test_without_the_export_extra_the_job_says_how_to_install_it(export_format, module, artifacts, tmp_path):
    model_uri = artifacts("seed_cnn_rgb_binary")
    completed = run_job("--model", model_uri, "--format", export_format, "--output", str(tmp_path / "o"),
                        prelude=f"sys.modules[{module!r}] = None")  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "pip install 'imgcls[export]'" in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "o").exists()
