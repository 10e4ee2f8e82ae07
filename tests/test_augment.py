import numpy as np
import pytest

from imgcls.data.augment import augment_batch, augment_rows, sample_grid
from imgcls.config import AugmentConfig

OPS = {
    "horizontal_flip": {"horizontal_flip": True},
    "vertical_flip": {"vertical_flip": True},
    "rotation": {"rotation_degrees": 30},
    "shear": {"shear_degrees": 20},
    "zoom": {"zoom": 0.3},
    "translation": {"translation": 0.2},
    "brightness": {"brightness": 0.3},
    "contrast": {"contrast": 0.5},
}


@pytest.fixture
def images() -> np.ndarray:
    generator = np.random.default_rng(0)
    return generator.integers(0, 256, (8, 12, 10, 3)).astype(np.uint8)


ROWS = np.arange(100, 108)


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_is_deterministic_per_epoch_and_keeps_shape_dtype_range(op, images):
    config = AugmentConfig(**OPS[op])
    first = augment_batch(images, ROWS, config, seed=3, epoch=1)
    again = augment_batch(images, ROWS, config, seed=3, epoch=1)
    other_epoch = augment_batch(images, ROWS, config, seed=3, epoch=2)
    other_seed = augment_batch(images, ROWS, config, seed=4, epoch=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_epoch)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, images)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert first.min() >= 0 and first.max() <= 255
    np.testing.assert_array_equal(images, np.random.default_rng(0).integers(0, 256, (8, 12, 10, 3)).astype(np.uint8))


def test_result_depends_on_the_row_not_on_batching(images):
    config = AugmentConfig(rotation_degrees=20, brightness=0.2)
    whole = augment_batch(images, ROWS, config, seed=1, epoch=0)
    halves = np.concatenate(
        [augment_batch(images[:3], ROWS[:3], config, 1, 0), augment_batch(images[3:], ROWS[3:], config, 1, 0)]
    )
    np.testing.assert_array_equal(whole, halves)


def test_flips_are_exact_mirrors(images):
    flipped = augment_batch(images, ROWS, AugmentConfig(horizontal_flip=True), seed=0, epoch=0)
    for original, result in zip(images, flipped):
        assert np.array_equal(result, original) or np.array_equal(result, original[:, ::-1])
    mirrored = sum(not np.array_equal(result, original) for original, result in zip(images, flipped))
    assert 0 < mirrored < len(images)


def test_inactive_config_returns_images_untouched(images):
    assert augment_batch(images, ROWS, AugmentConfig(), seed=0, epoch=5) is images


def test_labels_and_other_columns_pass_through(images):
    batch = {"image": images, "row": ROWS, "label": np.arange(8)}
    output = augment_rows(batch, AugmentConfig(zoom=0.2), seed=0, epoch=0)
    np.testing.assert_array_equal(output["label"], np.arange(8))
    np.testing.assert_array_equal(output["row"], ROWS)


def test_sample_grid_shows_original_and_variants(images):
    grid = sample_grid(images[:2], ROWS[:2], AugmentConfig(rotation_degrees=10), seed=0, variants=3, scale=2)
    assert grid.size == ((4 * 10 + 3 * 2) * 2, (2 * 12 + 2) * 2)


def test_training_pipeline_augments_only_the_training_split(ray_session, images):
    """Train batches go through `epoch_pipeline`; validation and prediction read decoded pixels as they are."""
    import ray.data

    from imgcls.config import load_job_config
    from imgcls.training.feed import epoch_pipeline, evaluation_batches

    dataset = ray.data.from_items(
        [{"image": image, "label": 0, "row": int(row)} for image, row in zip(images, ROWS)]
    ).materialize()
    config = load_job_config(None, ["data.train=/x", "augment.brightness=0.5", "train.batch_size=8"])
    trained = np.concatenate(
        [batch["image"] for batch in epoch_pipeline(dataset, config, 0, 0).iter_batches(batch_format="numpy")]
    )
    rows = np.concatenate([batch["row"] for batch in epoch_pipeline(dataset, config, 0, 0).iter_batches(batch_format="numpy")])
    expected = augment_batch(images[np.searchsorted(ROWS, rows)], rows, config.augment, config.seed, 0)
    np.testing.assert_array_equal(np.sort(trained.ravel()), np.sort(expected.ravel()))
    evaluated = np.concatenate([batch["image"] for batch in evaluation_batches(dataset, 4)])
    np.testing.assert_array_equal(np.sort(evaluated.ravel()), np.sort(images.ravel()))
