"""Train-time augmentation of uint8 image batches, reproducible per (seed, epoch, row).

Every image draws its own parameters from a seed made of (seed, epoch, row id), so the result does
not depend on batching, worker count or data order, and differs from one epoch to the next.
Geometric ops (flip, rotation, shear, zoom, translation) are one inverse affine map per image,
sampled bilinearly with edge pixels repeated (Keras' `fill_mode="nearest"`); photometric ops
(brightness, contrast) follow. Labels are never touched.
"""

from __future__ import annotations

import numpy as np

from imgcls.config import AugmentConfig

# Uniform draws per image: h-flip, v-flip, rotation, shear, zoom, shift-y, shift-x, brightness, contrast.
DRAWS_PER_IMAGE = 9


def uniform_draws(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """(len(rows), DRAWS_PER_IMAGE) floats in [0, 1), fixed by (seed, epoch, row)."""
    draws = np.empty((len(rows), DRAWS_PER_IMAGE), dtype=np.float64)
    for position, row in enumerate(rows):
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, int(row)]).generate_state(DRAWS_PER_IMAGE)
        draws[position] = state / 2.0**32
    return draws


def _affine_matrices(config: AugmentConfig, draws: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-image 2x3 maps from output pixel (y, x) to source pixel (y, x)."""
    count = len(draws)
    symmetric = 2.0 * draws - 1.0  # in [-1, 1)
    angle = np.deg2rad(config.rotation_degrees) * symmetric[:, 2]
    shear = np.deg2rad(config.shear_degrees) * symmetric[:, 3]
    zoom = 1.0 + config.zoom * symmetric[:, 4]  # > 1 magnifies
    shift_y = config.translation * height * symmetric[:, 5]
    shift_x = config.translation * width * symmetric[:, 6]
    flip_x = np.where(config.horizontal_flip & (draws[:, 0] < 0.5), -1.0, 1.0)
    flip_y = np.where(config.vertical_flip & (draws[:, 1] < 0.5), -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    # Forward map on centred coordinates (y, x): flip, then zoom, shear and rotate.
    forward = np.zeros((count, 2, 2))
    forward[:, 0, 0] = zoom * cos * flip_y
    forward[:, 0, 1] = zoom * (sin + cos * np.tan(shear)) * flip_x
    forward[:, 1, 0] = -zoom * sin * flip_y
    forward[:, 1, 1] = zoom * (cos - sin * np.tan(shear)) * flip_x
    inverse = np.linalg.inv(forward)
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    offset = centre - np.einsum("nij,nj->ni", inverse, centre + np.stack([shift_y, shift_x], axis=1))
    return np.concatenate([inverse, offset[:, :, None]], axis=2)


def _sample_bilinear(images: np.ndarray, source_y: np.ndarray, source_x: np.ndarray) -> np.ndarray:
    """images (N, H, W, C) float; source coordinates (N, H, W); edges repeat beyond the border."""
    count, height, width, _ = images.shape
    source_y = np.clip(source_y, 0.0, height - 1.0)
    source_x = np.clip(source_x, 0.0, width - 1.0)
    top = np.floor(source_y).astype(np.int64)
    left = np.floor(source_x).astype(np.int64)
    bottom = np.minimum(top + 1, height - 1)
    right = np.minimum(left + 1, width - 1)
    weight_y = (source_y - top)[..., None]
    weight_x = (source_x - left)[..., None]
    batch = np.arange(count)[:, None, None]
    upper = images[batch, top, left] * (1 - weight_x) + images[batch, top, right] * weight_x
    lower = images[batch, bottom, left] * (1 - weight_x) + images[batch, bottom, right] * weight_x
    return upper * (1 - weight_y) + lower * weight_y


def augment_batch(images: np.ndarray, rows: np.ndarray, config: AugmentConfig, seed: int, epoch: int) -> np.ndarray:
    """Augment uint8 images (N, H, W, C); returns a new uint8 array of the same shape."""
    if not config.is_active or len(images) == 0:
        return images
    count, height, width, _ = images.shape
    draws = uniform_draws(seed, epoch, rows)
    pixels = images.astype(np.float32)
    if config.is_geometric:
        matrices = _affine_matrices(config, draws, height, width)
        grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
        source_y = matrices[:, 0, 0, None, None] * grid_y + matrices[:, 0, 1, None, None] * grid_x + matrices[:, 0, 2, None, None]
        source_x = matrices[:, 1, 0, None, None] * grid_y + matrices[:, 1, 1, None, None] * grid_x + matrices[:, 1, 2, None, None]
        pixels = _sample_bilinear(pixels, source_y, source_x).astype(np.float32)
    if config.contrast:
        factor = (1.0 + config.contrast * (2.0 * draws[:, 8] - 1.0)).astype(np.float32)[:, None, None, None]
        mean = pixels.mean(axis=(1, 2, 3), keepdims=True)
        pixels = (pixels - mean) * factor + mean
    if config.brightness:
        pixels = pixels + (255.0 * config.brightness * (2.0 * draws[:, 7] - 1.0)).astype(np.float32)[:, None, None, None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def augment_rows(batch: dict[str, np.ndarray], config: AugmentConfig, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: augment the `image` column keyed by the `row` column; other columns pass through."""
    output = dict(batch)
    output["image"] = augment_batch(batch["image"], batch["row"], config, seed, epoch)
    return output


def sample_grid(images: np.ndarray, rows: np.ndarray, config: AugmentConfig, seed: int, variants: int = 6, scale: int = 4):
    """A Pillow image: one row per input image, its original first, then `variants` epochs' augmentations."""
    from PIL import Image

    count, height, width, channels = images.shape
    columns = [images] + [augment_batch(images, rows, config, seed, epoch) for epoch in range(variants)]
    gap = 2
    canvas = np.full(
        (count * (height + gap) - gap, len(columns) * (width + gap) - gap, channels), 255, dtype=np.uint8
    )
    for column, batch in enumerate(columns):
        for row in range(count):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = batch[row]
    grid = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def describe(config: AugmentConfig) -> str:
    parts = [
        name
        for name, active in (("horizontal flip", config.horizontal_flip), ("vertical flip", config.vertical_flip))
        if active
    ]
    for name, value, unit in (
        ("rotation", config.rotation_degrees, "deg"),
        ("shear", config.shear_degrees, "deg"),
        ("zoom", config.zoom, ""),
        ("translation", config.translation, ""),
        ("brightness", config.brightness, ""),
        ("contrast", config.contrast, ""),
    ):
        if value:
            parts.append(f"{name} {value:g}{unit}")
    return ", ".join(parts) if parts else "off"
