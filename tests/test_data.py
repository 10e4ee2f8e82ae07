from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import datasets, listing
from imgcls.errors import DataError


def make_tree(root: Path, files: list[str]) -> None:
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
        else:
            path.write_text("not an image")


def test_listing_is_recursive_case_insensitive_and_skips_hidden_and_non_images(tmp_path):
    make_tree(
        tmp_path,
        ["cat/a.PNG", "cat/deep/b.jpeg", "dog/c.JpG", "dog/.hidden.png", ".git/x.png", "dog/notes.txt", "loose.png"],
    )
    labelled = listing.list_labelled(str(tmp_path))
    assert labelled.class_names == ["cat", "dog"]
    assert [Path(p).name for p in labelled.paths] == ["a.PNG", "b.jpeg", "c.JpG"]
    assert labelled.labels == ["cat", "cat", "dog"]
    # hidden file, hidden folder, text file and the image outside any class folder
    assert labelled.ignored == 4


def test_listing_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        listing.list_labelled(str(tmp_path / "nope"))
    make_tree(tmp_path / "one", ["only/a.png", "only/b.png"])
    with pytest.raises(DataError, match="Only one class"):
        listing.list_labelled(str(tmp_path / "one"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="No labelled images"):
        listing.list_labelled(str(tmp_path / "empty"))


def labelled(counts: dict[str, int]) -> listing.LabelledImages:
    paths, labels = [], []
    for name, count in counts.items():
        paths += [f"/d/{name}/{i}.png" for i in range(count)]
        labels += [name] * count
    return listing.LabelledImages(paths=paths, labels=labels, class_names=sorted(counts))


def test_stratified_split_is_deterministic_and_keeps_every_class():
    images = labelled({"a": 50, "b": 10, "c": 2, "d": 1})
    train, val = listing.stratified_split(images, 0.2, seed=3)
    again_train, again_val = listing.stratified_split(images, 0.2, seed=3)
    assert train.paths == again_train.paths and val.paths == again_val.paths
    assert val.counts() == {"a": 10, "b": 2, "c": 1, "d": 0}
    assert train.counts() == {"a": 40, "b": 8, "c": 1, "d": 1}
    assert not set(train.paths) & set(val.paths)
    other_train, _ = listing.stratified_split(images, 0.2, seed=4)
    assert other_train.paths != train.paths


def test_zero_val_fraction_means_no_validation():
    images = labelled({"a": 5, "b": 5})
    train, val = listing.stratified_split(images, 0.0, seed=0)
    assert val is None and train is images


def test_prepare_split_decodes_and_reports_unreadable_files(ray_session, tmp_path):
    make_tree(tmp_path, [f"cat/{i}.png" for i in range(5)] + [f"dog/{i}.png" for i in range(4)])
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "cat" / "empty.jpg").write_bytes(b"")
    images = listing.list_labelled(str(tmp_path))
    prepared = datasets.prepare_split(images, (6, 6), 3, 10_000, decode_batch_size=4, seed=0, split_name="train")
    assert prepared.num_rows == 9
    assert prepared.class_counts == {"cat": 5, "dog": 4}
    assert sorted(Path(row["path"]).name for row in prepared.skipped) == ["broken.png", "empty.jpg"]
    rows = prepared.dataset.take_all()
    assert len(rows) == 9
    assert all(row["image"].shape == (6, 6, 3) and row["image"].dtype == np.uint8 for row in rows)
    assert sorted(int(row["label"]) for row in rows) == [0] * 5 + [1] * 4


def test_csv_and_parquet_manifests_with_relative_and_absolute_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_tree(tmp_path / "images", ["a.png", "b.png", "c.png"])
    absolute = str(tmp_path / "images" / "c.png")
    (tmp_path / "manifest.csv").write_text(f"path,label\nimages/a.png,cat\nimages/b.png,dog\n{absolute},dog\n")
    from_csv = listing.list_labelled(str(tmp_path / "manifest.csv"))
    assert from_csv.class_names == ["cat", "dog"]
    assert from_csv.paths == [str(tmp_path / "images" / name) for name in ["a.png", "b.png", "c.png"]]
    pq.write_table(
        pa.table({"path": ["images/a.png", "images/b.png"], "label": [1, 2]}), tmp_path / "manifest.parquet"
    )
    from_parquet = listing.list_labelled(str(tmp_path / "manifest.parquet"))
    assert from_parquet.class_names == ["1", "2"]
    prediction_inputs = listing.list_prediction_inputs(str(tmp_path / "manifest.csv"))
    assert len(prediction_inputs.paths) == 3


def test_bad_manifests_are_data_errors(tmp_path):
    (tmp_path / "no_label.csv").write_text("path\nx.png\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        listing.list_labelled(str(tmp_path / "no_label.csv"))
    (tmp_path / "blank.csv").write_text("path,label\nx.png,cat\ny.png,\n")
    with pytest.raises(DataError, match="empty path or label"):
        listing.list_labelled(str(tmp_path / "blank.csv"))
    with pytest.raises(DataError, match="does not exist"):
        listing.list_labelled(str(tmp_path / "missing.csv"))
