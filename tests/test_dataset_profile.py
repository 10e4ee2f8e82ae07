"""The dataset profile evaluate writes (dataset_profile.json, class_balance.png, the report's Dataset
section): through the real CLI in the job's own process on a folder with known counts, duplicates, a
label conflict, two image sizes and an unreadable file; and the profile's bounds on its own."""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import IMAGE_SIZE
from PIL import Image

from imgcls import cli
from imgcls.reporting.dataset_profile import LISTED_COPIES, LISTED_GROUPS, profile_dataset
from imgcls.reporting.plots import class_balance_chart

CLASS_NAMES = ["ant", "bee", "cat"]  # cat: a class the model knows and the set lacks


@pytest.fixture(scope="module")
def three_class_artifact(tmp_path_factory) -> str:
    """The tutorial CNN with its initial weights for three classes: the profile does not depend on
    how good the model is."""
    from imgcls.modeling.artifact import save_artifact
    from imgcls.modeling.models import create_seed_cnn

    uri = str(tmp_path_factory.mktemp("three_class_artifact") / "model")
    fields = {"class_names": CLASS_NAMES, "image_size": (IMAGE_SIZE, IMAGE_SIZE), "channels": 3,
              "task": "multiclass", "model_name": "seed_cnn"}  # fmt: skip
    save_artifact(create_seed_cnn((IMAGE_SIZE, IMAGE_SIZE), 3, len(CLASS_NAMES)), fields, uri)
    return uri


def noise_png(path: Path, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """ant: 5 images of 16x16, two of them byte-identical (twin_1, twin_2); bee: two of 32x24, a copy
    of ant/a0.png (a label conflict) and an unreadable file. 9 listed, 8 readable."""
    root = tmp_path / "labelled"
    for number in range(3):
        noise_png(root / "ant" / f"a{number}.png", 16, 16, seed=number)
    twin = noise_png(root / "ant" / "twin_1.png", 16, 16, seed=10)
    (root / "ant" / "twin_2.png").write_bytes(twin)
    for number in range(2):
        noise_png(root / "bee" / f"b{number}.png", 32, 24, seed=20 + number)
    (root / "bee" / "shared.png").write_bytes((root / "ant" / "a0.png").read_bytes())
    (root / "bee" / "broken.png").write_bytes(b"not a png")
    return root


def test_evaluate_writes_the_dataset_profile_figure_and_report_section(three_class_artifact, labelled_folder, tmp_path, caplog):
    output = tmp_path / "report"
    arguments = ["evaluate", "--model", three_class_artifact, "--data", str(labelled_folder), "--output", str(output),
                 "--set", "placement=driver"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="imgcls.evaluate")
    assert cli.main(arguments) == 0
    log = caplog.text
    assert "dataset: 9 images (8 readable, 1 unreadable), 3 classes, imbalance 1.25" in log
    assert "2 duplicate groups (4 images), 1 label conflicts" in log
    profile = json.loads((output / "dataset_profile.json").read_text())
    assert (profile["labels"], profile["images"], profile["readable"], profile["unreadable"]) == ("single", 9, 8, 1)
    assert profile["class_balance"] == {
        "ant": {"images": 5, "share": round(5 / 9, 6)},
        "bee": {"images": 4, "share": round(4 / 9, 6)},
        "cat": {"images": 0, "share": 0.0},
    }
    assert profile["imbalance_ratio"] == 1.25 and profile["classes_without_images"] == ["cat"]
    assert profile["images_without_labels"] is None and profile["mean_labels_per_image"] is None

    sizes = profile["image_sizes"]
    assert sizes["most_common"] == [{"width": 16, "height": 16, "images": 6}, {"width": 32, "height": 24, "images": 2}]
    widths, heights = np.array([16] * 6 + [32] * 2), np.array([16] * 6 + [24] * 2)
    for name, values in (("width", widths), ("height", heights), ("aspect_ratio", widths / heights)):
        p05, p50, p95 = np.quantile(values, [0.05, 0.5, 0.95])
        assert sizes[name] == pytest.approx({"p05": p05, "p50": p50, "p95": p95, "min": values.min(), "max": values.max()}, abs=1e-4)

    duplicates = profile["duplicates"]
    assert (duplicates["groups"], duplicates["images"]) == (2, 4)
    assert (duplicates["label_conflicts"], duplicates["images_in_label_conflicts"]) == (1, 2)
    twins = {"content_digest": digest((labelled_folder / "ant" / "twin_1.png").read_bytes()), "images": 2,
             "label_conflict": False, "copies": [{"path": str(labelled_folder / "ant" / name), "labels": ["ant"]}
                                                 for name in ("twin_1.png", "twin_2.png")]}  # fmt: skip
    conflict = {"content_digest": digest((labelled_folder / "ant" / "a0.png").read_bytes()), "images": 2,
                "label_conflict": True, "copies": [{"path": str(labelled_folder / "ant" / "a0.png"), "labels": ["ant"]},
                                                   {"path": str(labelled_folder / "bee" / "shared.png"), "labels": ["bee"]}]}  # fmt: skip
    assert duplicates["label_conflict_groups"] == [conflict]
    assert sorted(duplicates["largest_groups"], key=lambda group: group["label_conflict"]) == [twins, conflict]

    with Image.open(output / "class_balance.png") as image:
        assert image.format == "PNG"
        image.verify()
    report = (output / "report.md").read_text()
    section = report[report.index("## Dataset") : report.index("## Confusion matrix")]
    assert "- images: 9 listed, 8 readable, 1 unreadable" in section
    assert "ant 5 (55.6%), bee 4 (44.4%), cat 0 (0.0%)" in section and "classes without images: cat" in section
    assert "16x16 (6), 32x24 (2)" in section
    assert "label conflicts (the same bytes labelled differently): 1 groups (2 images)" in section
    assert f"`{labelled_folder / 'bee' / 'shared.png'}` (bee)" in section
    assert "![class balance](class_balance.png)" in section and "(dataset_profile.json)" in section


def test_the_profile_lists_a_bounded_number_of_groups_and_shows_each_conflicting_label():
    # 12 groups of 7 copies; in each, the last copy by path carries another label (multi-label sets,
    # compared whatever their order).
    paths, label_sets, digests = [], [], []
    for group in range(12):
        for copy in range(7):
            paths.append(f"images/{group:02d}_{copy}.png")
            label_sets.append(("red", "blue") if copy < 6 else ("green",))
            digests.append(f"{group:032x}")
    paths.append("images/unread.png")
    label_sets.append(())
    digests.append("")  # never read: no digest, never a duplicate
    rows = len(paths)
    errors = [None] * (rows - 1) + ["cannot read file"]
    # Decoded rows in another order than the listing, as blocks from an actor pool may come.
    decoded = pa.table({
        "path": paths[::-1], "error": pa.array(errors[::-1], pa.string()),
        "original_width": pa.array([16] * rows, pa.int32()), "original_height": pa.array([8] * rows, pa.int32()),
        "content_digest": digests[::-1],
    })  # fmt: skip
    profile = profile_dataset(paths, [tuple(names[::-1]) for names in label_sets], True, ["blue", "green", "red"], decoded)
    assert (profile.readable, profile.unreadable, profile.images_without_labels) == (84, 1, 1)
    assert profile.mean_labels_per_image == pytest.approx((12 * 6 * 2 + 12) / 85, abs=1e-6)
    assert profile.class_balance["green"].images == 12 and profile.imbalance_ratio == 6.0
    assert profile.image_sizes.aspect_ratio.p50 == 2.0
    duplicates = profile.duplicates
    assert (duplicates.groups, duplicates.images, duplicates.label_conflicts) == (12, 84, 12)
    assert len(duplicates.largest_groups) == len(duplicates.label_conflict_groups) == LISTED_GROUPS
    first = duplicates.label_conflict_groups[0]
    assert first.images == 7 and len(first.copies) == LISTED_COPIES
    # The conflicting copy is shown though it sorts last by path.
    assert [copy.labels for copy in first.copies[:2]] == [["blue", "red"], ["green"]]
    assert first.copies[1].path == "images/00_6.png"


def test_the_class_balance_chart_is_a_png_for_few_and_for_many_classes():
    for counts in ({"ant": 5, "bee": 0}, {f"class_{number}": number for number in range(60)}):
        png = class_balance_chart(counts)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
