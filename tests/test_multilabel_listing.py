"""Multi-label manifests: a `labels` column (CSV `a|b`, Parquet list<string>), zero-label rows,
repeated and conflicting rows, and the label matrix training and evaluation read."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgcls.data.listing import check_known_classes, list_labelled, list_prediction_inputs, stratified_split
from imgcls.errors import DataError


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_csv_labels_column_is_multilabel_with_zero_label_rows(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["path,labels", "a.png,dog|cat", "b.png,", "c.png, car ", "d.png,cat|cat"])
    images = list_labelled(manifest)
    assert images.multilabel
    assert images.class_names == ["car", "cat", "dog"]
    assert images.label_sets == [("cat", "dog"), (), ("car",), ("cat",)]
    assert images.unlabelled_count() == 1
    assert images.counts() == {"car": 1, "cat": 2, "dog": 1}
    np.testing.assert_array_equal(images.label_matrix(), [[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="label matrix"):
        images.label_indices()


def test_parquet_list_column_with_nulls_and_empty_lists(tmp_path):
    table = pa.table({"path": ["x.png", "y.png", "z.png"],
                      "labels": pa.array([["person", "dog"], None, []], pa.list_(pa.string()))})  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet")
    images = list_labelled(str(tmp_path / "m.parquet"))
    assert images.class_names == ["dog", "person"]
    assert images.label_sets == [("dog", "person"), (), ()]
    assert images.paths == [str(tmp_path / name) for name in ("x.png", "y.png", "z.png")]


def test_single_label_manifest_and_folders_are_unchanged(tmp_path):
    images = list_labelled(write_csv(tmp_path / "m.csv", ["path,label", "a.png,dog", "b.png,cat"]))
    assert not images.multilabel and images.labels == ["dog", "cat"]
    np.testing.assert_array_equal(images.label_matrix(), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(images.label_indices(), [1, 0])


@pytest.mark.parametrize(
    "lines, message",
    [
        (["path,labels", "a.png,cat||dog", "b.png,dog"], r"empty class name \(CSV lines \[2\]"),
        (["path,labels", "a.png,cat|", "b.png,dog"], "empty class name"),
        (["path,label,labels", "a.png,cat,cat|dog"], "both a `label` column"),
        (["path,tags", "a.png,cat"], r"lacks column\(s\) \['label'\] \(or \['labels'\]"),
        (["path,labels", "a.png,cat", "a.png,cat|dog"], "two different label sets: .*cat and cat|dog"),
        (["path,labels", "a.png,cat"], "Only one class"),
    ],
)
def test_bad_multilabel_manifests_are_named(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        list_labelled(write_csv(tmp_path / "m.csv", lines))


def test_repeated_identical_rows_are_dropped(tmp_path):
    images = list_labelled(write_csv(tmp_path / "m.csv", ["path,labels", "a.png,cat|dog", "a.png,dog|cat", "b.png,"]))
    assert images.paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_unknown_classes_are_named(tmp_path):
    images = list_labelled(write_csv(tmp_path / "m.csv", ["path,labels", "a.png,cat|zebra", "b.png,dog"]))
    with pytest.raises(DataError, match=r"data.val has class\(es\) \['zebra'\] that data.train does not know"):
        check_known_classes(images, ["cat", "dog"], "data.val", "data.train")
    check_known_classes(images, ["cat", "dog", "zebra"], "data.val", "data.train")


def test_split_keeps_label_sets_and_is_deterministic(tmp_path):
    rows = ["path,labels"] + [f"{i}.png,{'cat|dog' if i % 3 == 0 else ('dog' if i % 3 == 1 else '')}" for i in range(30)]
    images = list_labelled(write_csv(tmp_path / "m.csv", rows))
    train, val = stratified_split(images, 0.2, seed=3)
    again_train, _ = stratified_split(images, 0.2, seed=3)
    assert train.paths == again_train.paths
    assert len(train.paths) + len(val.paths) == 30 and not set(train.paths) & set(val.paths)
    assert val.multilabel and set(val.label_sets) == {("cat", "dog"), ("dog",), ()}
    by_path = dict(zip(images.paths, images.label_sets))
    assert all(by_path[path] == names for path, names in zip(val.paths, val.label_sets))


def test_prediction_inputs_ignore_the_labels_column(tmp_path):
    listing = list_prediction_inputs(write_csv(tmp_path / "m.csv", ["path,labels", "a.png,cat|dog", "b.png,"]))
    assert listing.paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
