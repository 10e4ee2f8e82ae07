"""Multi-label training: the loss, the threshold rule and task resolution without Ray, then one real
training run through the CLI on images whose labels are visible (class k <=> a bright bar in region k)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data.listing import list_labelled
from imgcls.errors import DataError
from imgcls.training.task import conform, resolve_multilabel
from imgcls.training.thresholds import best_threshold, choose_thresholds, exact_match, micro_f1

CLASSES = ["left", "middle", "right"]
SIZE = 16


def marked_image(label_set: tuple[str, ...], generator: np.random.Generator) -> np.ndarray:
    """Grey noise with a bright vertical bar in the third of the image of each class it carries."""
    pixels = generator.integers(0, 90, size=(SIZE, SIZE, 3)).astype(np.uint8)
    width = SIZE // 3
    for name in label_set:
        left = CLASSES.index(name) * width + 1
        top = int(generator.integers(1, 5))
        pixels[top : top + 10, left : left + width - 2] = generator.integers(200, 256)
    return pixels


def write_marked_set(root: Path, count: int, seed: int) -> Path:
    """`count` images with each class present independently with probability 0.4 (so about 20%
    carry none), and a CSV manifest `path,labels` beside them."""
    generator = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        label_set = tuple(name for name in CLASSES if generator.random() < 0.4)
        Image.fromarray(marked_image(label_set, generator)).save(root / f"{index:04d}.png")
        rows.append((f"{index:04d}.png", "|".join(label_set)))
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return manifest


# --- the loss, against a hand computation ----------------------------------------------------------


def numpy_multilabel_loss(targets, probabilities, smoothing=0.0, positive_weights=None):
    targets = targets * (1 - smoothing) + 0.5 * smoothing
    probabilities = np.clip(probabilities, 1e-7, 1 - 1e-7)
    weights = np.ones(targets.shape[1]) if positive_weights is None else np.asarray(positive_weights)
    terms = weights * targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities)
    return -terms.mean(axis=1)


@pytest.mark.parametrize("smoothing, weights", [(0.0, None), (0.1, None), (0.0, [1.0, 3.0, 0.5]), (0.2, [2.0, 1.0, 4.0])])
def test_multilabel_loss_is_bce_averaged_over_classes(smoothing, weights):
    from imgcls.modeling.losses import create_loss

    targets = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], np.float32)
    probabilities = np.array([[0.9, 0.2, 0.6], [0.1, 0.3, 0.05], [0.5, 0.99, 0.0]], np.float32)
    loss = create_loss(3, label_smoothing=smoothing, class_weights=weights, multilabel=True)
    np.testing.assert_allclose(
        np.asarray(loss(targets, probabilities)), numpy_multilabel_loss(targets, probabilities, smoothing, weights),
        rtol=1e-5,
    )  # fmt: skip


def test_balanced_positive_weights_are_negatives_over_positives_capped():
    from imgcls.modeling.losses import MAX_POSITIVE_WEIGHT, positive_weight_vector

    counts = {"common": 50, "rare": 10, "tiny": 1}
    assert positive_weight_vector("balanced", list(counts), counts, 500) == [9.0, 49.0, MAX_POSITIVE_WEIGHT]
    assert positive_weight_vector({"rare": 2.5}, list(counts), counts, 500) == [1.0, 2.5, 1.0]
    assert positive_weight_vector(None, list(counts), counts, 500) is None


# --- the threshold rule, against scikit-learn by brute force --------------------------------------


def test_thresholds_maximise_each_class_f1_like_a_brute_force_search():
    from sklearn.metrics import f1_score

    generator = np.random.default_rng(7)
    targets = (generator.random((120, 4)) < [0.3, 0.5, 0.1, 0.0]).astype(np.float32)
    # Informative but noisy scores, some tied (rounded to 2 decimals).
    probabilities = np.round(np.clip(0.35 * targets + 0.65 * generator.random((120, 4)), 0, 1), 2)
    thresholds, class_f1 = choose_thresholds(probabilities, targets)
    for k in range(3):
        candidates = np.unique(np.concatenate([probabilities[:, k], [0.0, 1.0]]))
        grid = np.concatenate([candidates, (candidates[1:] + candidates[:-1]) / 2])
        best = max(f1_score(targets[:, k], probabilities[:, k] >= t, zero_division=0) for t in grid)
        assert f1_score(targets[:, k], probabilities[:, k] >= thresholds[k], zero_division=0) == pytest.approx(best)
        assert class_f1[k] == pytest.approx(best)
        assert 0.0 < thresholds[k] < 1.0
        assert thresholds[k] not in set(probabilities[:, k])  # in a gap, never on a score
    assert thresholds[3] == 0.5  # no positive in validation: the default


def test_threshold_sits_in_the_middle_of_the_gap_and_ties_go_lowest():
    # Separable: positives at 0.7 and 0.9, negatives at 0.1 and 0.3 -> the middle of the gap.
    assert best_threshold(np.array([0.1, 0.3, 0.7, 0.9]), np.array([0, 0, 1, 1]))[0] == pytest.approx(0.5)
    # F1 is 2/3 both at "0.9 and up" and at "0.2 and up": the lowest threshold wins.
    threshold, f1 = best_threshold(np.array([0.9, 0.6, 0.5, 0.2]), np.array([1, 0, 0, 1]))
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(0.1)
    # The order of the images (how workers' shards were gathered) does not matter.
    probabilities = np.random.default_rng(3).random((50, 2))
    targets = (probabilities + np.random.default_rng(4).normal(0, 0.3, (50, 2)) > 0.6).astype(float)
    order = np.random.default_rng(5).permutation(50)
    assert choose_thresholds(probabilities, targets) == choose_thresholds(probabilities[order], targets[order])


def test_micro_f1_and_exact_match_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    generator = np.random.default_rng(11)
    targets = (generator.random((40, 3)) < 0.4).astype(int)
    probabilities = generator.random((40, 3))
    thresholds = [0.3, 0.5, 0.7]
    predicted = (probabilities >= thresholds).astype(int)
    assert micro_f1(probabilities, targets, thresholds) == pytest.approx(f1_score(targets, predicted, average="micro"))
    assert exact_match(probabilities, targets, thresholds) == pytest.approx(accuracy_score(targets, predicted))


# --- task resolution ------------------------------------------------------------------------------


def write_csv(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_task_resolution_and_conversion(tmp_path):
    multi = list_labelled(write_csv(tmp_path / "m.csv", ["path,labels", "a.png,cat|dog", "b.png,", "c.png,dog"]))
    single = list_labelled(write_csv(tmp_path / "s.csv", ["path,label", "a.png,cat", "b.png,dog"]))
    one_each = list_labelled(write_csv(tmp_path / "o.csv", ["path,labels", "a.png,cat", "b.png,dog"]))
    assert resolve_multilabel("auto", multi) and not resolve_multilabel("auto", single)
    assert resolve_multilabel("multilabel", single) and not resolve_multilabel("multiclass", multi)
    converted = conform(single, True, "data.train")
    assert converted.label_sets == [("cat",), ("dog",)] and converted.labels == single.labels
    np.testing.assert_array_equal(converted.label_matrix(), [[1, 0], [0, 1]])
    as_single = conform(one_each, False, "data.train")
    assert not as_single.multilabel and as_single.labels == ["cat", "dog"]
    with pytest.raises(DataError, match=r"multiclass but data.train .* 1 of 3 image\(s\) have no label and 1 have two or more"):
        conform(multi, False, "data.train")


def test_monitors_must_be_reported_metrics(tmp_path):
    from imgcls.config import load_job_config
    from imgcls.errors import ConfigError
    from imgcls.train import check_monitors

    base = [f"data.train={tmp_path}", f"output_dir={tmp_path / 'out'}"]
    check_monitors(load_job_config(None, base), multilabel=True)  # val_loss is fine for both
    with pytest.raises(ConfigError, match="train.early_stopping.monitor is 'val_accuracy', but a multi-label run"):
        check_monitors(load_job_config(None, [*base, "train.early_stopping.enabled=true",
                                              "train.early_stopping.monitor=val_accuracy"]), multilabel=True)  # fmt: skip
    with pytest.raises(ConfigError, match="checkpoint_monitor is 'val_micro_f1', but a single-label run"):
        check_monitors(load_job_config(None, [*base, "train.checkpoint_monitor=val_micro_f1"]), multilabel=False)


# --- one real training run through the CLI --------------------------------------------------------


@pytest.fixture(scope="module")
def multilabel_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multilabel")
    return write_marked_set(root / "train", 240, seed=1), write_marked_set(root / "holdout", 90, seed=2)


@pytest.fixture(scope="module")
def multilabel_run(ray_session, multilabel_data, tmp_path_factory):
    from imgcls import cli

    train_manifest, _ = multilabel_data
    output_dir = tmp_path_factory.mktemp("multilabel_run")
    config = output_dir.parent / "multilabel.yaml"
    config.write_text(
        f"data: {{train: {train_manifest}, image_size: [{SIZE}, {SIZE}], val_fraction: 0.25}}\n"
        "train: {epochs: 5, batch_size: 16, learning_rate: 0.003}\n"
        # Two workers: the label vectors shard like class indices, and the thresholds come from
        # both workers' validation shards gathered.
        "scaling: {num_workers: 2}\n"
    )
    code = cli.main(["train", "--config", str(config), "--set", f"output_dir={output_dir}"])
    assert code == 0
    return output_dir


def test_multilabel_run_learns_the_marks_and_stores_thresholds(multilabel_run, multilabel_data):
    import keras
    from sklearn.metrics import f1_score

    metadata = json.loads((multilabel_run / "model" / "metadata.json").read_text())
    assert metadata["task"] == "multilabel" and metadata["class_names"] == CLASSES
    thresholds = metadata["thresholds"]
    assert len(thresholds) == len(CLASSES) and all(0.0 < value < 1.0 for value in thresholds)
    metrics = metadata["metrics"]
    assert "accuracy" not in metrics and "val_accuracy" not in metrics
    assert metrics["thresholds"] == thresholds and metrics["val_micro_f1_at_thresholds"] >= 0.8
    summary = metadata["data_summary"]
    assert summary["task"] == "multilabel" and summary["train_unlabelled_images"] > 0
    assert 0.8 < summary["train_label_cardinality"] < 1.6

    with (multilabel_run / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert {"micro_f1", "val_micro_f1", "exact_match", "val_exact_match"} <= set(history[0])
    assert "accuracy" not in history[0] and len(history) == 5
    assert metrics["val_images_for_thresholds"] == summary["val_images"]  # every worker's shard
    assert len(set(metrics["weights_checksums"])) == 1 and len(metrics["weights_checksums"]) == 2

    # Held-out images the run never saw, classified with the artifact's own thresholds.
    _, holdout_manifest = multilabel_data
    holdout = list_labelled(str(holdout_manifest))
    holdout.class_names = CLASSES
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in holdout.paths])
    model = keras.saving.load_model(multilabel_run / "model" / "model.keras", compile=False, safe_mode=True)
    probabilities = model.predict(images, verbose=0)
    targets = holdout.label_matrix()
    predicted = probabilities >= np.array(thresholds)
    held_out_f1 = f1_score(targets, predicted, average="micro")
    marginals = targets.mean(axis=0)
    chance = float((marginals**2).sum() / marginals.sum())  # micro-F1 of guessing each class at its rate
    assert held_out_f1 >= 0.8 and held_out_f1 > chance + 0.3, (held_out_f1, chance)


def test_multilabel_metrics_and_epoch_line(multilabel_run):
    # The artifact's metrics also carry the validation scores at both thresholds.
    metrics = json.loads((multilabel_run / "model" / "metadata.json").read_text())["metrics"]
    assert {"val_micro_f1_default_threshold", "val_exact_match_at_thresholds", "val_class_f1_at_thresholds"} <= set(metrics)
    from imgcls.training.worker import epoch_line

    line = epoch_line({**metrics, "epoch": 3}, 10, 5.0)
    assert line.startswith("epoch 3/10 loss ") and " micro_f1 " in line and " val_micro_f1 " in line


def test_multiclass_with_multilabel_rows_exits_2(ray_session, multilabel_data, tmp_path, capsys):
    from imgcls import cli

    train_manifest, _ = multilabel_data
    config = tmp_path / "multiclass.yaml"
    config.write_text(f"data: {{train: {train_manifest}}}\nmodel: {{task: multiclass}}\noutput_dir: {tmp_path / 'out'}\n")
    code = cli.main(["train", "--config", str(config)])
    assert code == 2
    message = capsys.readouterr().err
    assert "model.task is multiclass" in message and "have no label" in message and "two or more" in message


def test_label_vectors_reach_numpy_batches_as_float32_matrices(ray_session, multilabel_data):
    from imgcls.data.datasets import prepare_split

    train_manifest, _ = multilabel_data
    images = list_labelled(str(train_manifest)).subset(np.arange(40))
    split = prepare_split(images, (SIZE, SIZE), 3, 10**7, 16, seed=0, split_name="train")
    batch = split.dataset.take_batch(40, batch_format="numpy")
    assert batch["label"].dtype == np.float32 and batch["label"].shape == (40, len(CLASSES))
    by_row = dict(zip(batch["row"].tolist(), batch["label"]))
    order = np.random.default_rng(0).permutation(40)  # prepare_split's seeded shuffle
    expected = images.subset(order).label_matrix()
    for row, vector in by_row.items():
        np.testing.assert_array_equal(vector, expected[row])
    assert split.unlabelled == sum(1 for names in images.label_sets if not names)


# --- the example config, Tune's metric and warm starts --------------------------------------------


def test_example_config_is_valid():
    from imgcls.config import load_job_config

    config = load_job_config(Path(__file__).resolve().parents[1] / "examples" / "configs" / "digits_multilabel.yaml")
    assert config.model.task == "auto" and config.data.train.endswith("train.csv")


def test_tune_metric_default_becomes_val_micro_f1_for_multilabel_data(tmp_path):
    from imgcls.config import load_job_config
    from imgcls.errors import ConfigError
    from imgcls.tune import resolve_metric

    manifest = write_csv(tmp_path / "m.csv", ["path,labels", "a.png,cat|dog", "b.png,", "c.png,dog"])
    base = [f"data.train={manifest}", f"output_dir={tmp_path / 'out'}", "tune.search_space={train.epochs: {choice: [1, 2]}}"]
    assert resolve_metric(load_job_config(None, base)).tune.metric == "val_micro_f1"
    assert resolve_metric(load_job_config(None, [*base, "tune.metric=val_loss"])).tune.metric == "val_loss"
    with pytest.raises(ConfigError, match="tune.metric is val_accuracy, but the trials train on multi-label data"):
        resolve_metric(load_job_config(None, [*base, "tune.metric=val_accuracy"]))
    folders = tmp_path / "folders"
    for name in ("a", "b"):
        (folders / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folders / name / "x.png")
    single = [f"data.train={folders}", *base[1:]]
    assert resolve_metric(load_job_config(None, single)).tune.metric == "val_accuracy"
    with pytest.raises(ConfigError, match="single-label data"):
        resolve_metric(load_job_config(None, [*single, "tune.metric=val_micro_f1"]))


def test_warm_start_builds_a_new_head_across_tasks_and_keeps_it_within(tmp_path):
    from imgcls.config import load_job_config
    from imgcls.modeling.artifact import save_artifact
    from imgcls.modeling.initial_weights import prepare_initial_weights
    from imgcls.modeling.models import create_seed_cnn

    def artifact(multilabel: bool) -> tuple[str, list]:
        uri = str(tmp_path / f"model_{multilabel}")
        model = create_seed_cnn((SIZE, SIZE), 3, 3, multilabel=multilabel)
        save_artifact(model, {"class_names": CLASSES, "image_size": (SIZE, SIZE), "channels": 3,
                              "task": "multilabel" if multilabel else "multiclass", "model_name": "seed_cnn"}, uri)  # fmt: skip
        return uri, model.get_layer("predictions").get_weights()

    for source_is_multilabel, head_kept in ((False, False), (True, True)):
        uri, source_head = artifact(source_is_multilabel)
        config = load_job_config(None, [f"data.train={tmp_path}", f"data.image_size=[{SIZE}, {SIZE}]",
                                        f"model.init_from={uri}", f"output_dir={tmp_path / 'out'}"])  # fmt: skip
        weights = prepare_initial_weights(config, CLASSES, multilabel=True)
        head_kernel = weights[-2]  # Dense(3, sigmoid): kernel, bias last
        assert np.array_equal(head_kernel, source_head[0]) == head_kept


def test_the_trained_model_predicts_evaluates_and_exports_end_to_end(multilabel_run, multilabel_data, tmp_path):
    """The trained artifact through the real CLI: predict writes the `labels` column at the stored
    thresholds, evaluate's metrics equal scikit-learn's on the same probabilities, and the exported
    ONNX model gives the same per-class sigmoids."""
    import keras
    import pyarrow.parquet as pq
    from sklearn.metrics import average_precision_score, f1_score, hamming_loss

    from imgcls import cli

    model_uri = str(multilabel_run / "model")
    _, holdout_manifest = multilabel_data
    metadata = json.loads((multilabel_run / "model" / "metadata.json").read_text())
    thresholds = np.array(metadata["thresholds"])
    model = keras.saving.load_model(multilabel_run / "model" / "model.keras", compile=False, safe_mode=True)
    holdout = list_labelled(str(holdout_manifest))
    holdout.class_names = CLASSES
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in holdout.paths]).astype(np.float32)
    probabilities = model.predict(images, verbose=0)

    predictions = tmp_path / "predictions"
    assert cli.main(["predict", "--model", model_uri, "--input", str(holdout_manifest), "--output", str(predictions),
                     "--top-k", "3"]) == 0  # fmt: skip
    table = pq.read_table(predictions).sort_by("path")
    assert table.column_names[-3:] == ["labels", "margin", "entropy"] and table.num_rows == len(holdout.paths)
    by_path = dict(zip(holdout.paths, probabilities))
    for path, labels, top_scores in zip(table.column("path").to_pylist(), table.column("labels").to_pylist(),
                                        table.column("top_k_scores").to_pylist()):  # fmt: skip
        expected = [name for name, value, threshold in zip(CLASSES, by_path[path], thresholds) if value >= threshold]
        assert labels == expected
        np.testing.assert_allclose(sorted(top_scores, reverse=True), sorted(by_path[path], reverse=True), atol=1e-5)

    evaluation = tmp_path / "evaluation"
    assert cli.main(["evaluate", "--model", model_uri, "--data", str(holdout_manifest), "--output", str(evaluation)]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    truth = holdout.label_matrix().astype(int)
    predicted = (probabilities >= thresholds).astype(int)
    assert metrics["micro_avg"]["f1"] == pytest.approx(f1_score(truth, predicted, average="micro"), abs=1e-6)
    assert metrics["macro_avg"]["f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-6)
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(truth, predicted), abs=1e-6)
    for column, name in enumerate(CLASSES):
        expected_ap = average_precision_score(truth[:, column], probabilities[:, column])
        assert metrics["per_class"][name]["average_precision"] == pytest.approx(expected_ap, abs=1e-5)
    assert metrics["micro_avg"]["f1"] >= 0.8

    exported = tmp_path / "onnx"
    assert cli.main(["export", "--model", model_uri, "--format", "onnx", "--output", str(exported)]) == 0
    import onnxruntime

    assert (exported / "labels.txt").read_text().split() == CLASSES
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    [onnx_probabilities] = session.run(["probabilities"], {"image": images})
    assert onnx_probabilities.shape == (len(images), len(CLASSES))  # a sigmoid per class, not a softmax
    np.testing.assert_allclose(onnx_probabilities, probabilities, atol=1e-4)
