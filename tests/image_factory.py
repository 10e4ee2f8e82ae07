"""Tiny, learnable image data sets made on the fly for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pattern_image(class_index: int, size: int, generator: np.random.Generator) -> np.ndarray:
    """Class 0: horizontal stripes, class 1: vertical stripes, class 2: a bright centre square;
    plus noise, so the classes are learnable but not trivially identical images."""
    image = generator.integers(0, 60, size=(size, size, 3)).astype(np.int32)
    offset = int(generator.integers(0, 4))
    if class_index == 0:
        image[(np.arange(size) + offset) % 4 < 2, :, :] += 170
    elif class_index == 1:
        image[:, (np.arange(size) + offset) % 4 < 2, :] += 170
    else:
        quarter = size // 4
        image[quarter : size - quarter, quarter : size - quarter, :] += 170
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pattern_dataset(
    root: Path, per_class: int, num_classes: int = 2, size: int = 16, seed: int = 0, extension: str = "png"
) -> list[str]:
    """Write `root/<class>/<n>.<extension>`; returns the class names."""
    generator = np.random.default_rng(seed)
    class_names = ["horizontal", "vertical", "square"][:num_classes]
    for class_index, class_name in enumerate(class_names):
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            Image.fromarray(pattern_image(class_index, size, generator)).save(folder / f"{number:04d}.{extension}")
    return class_names


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bad_image_corpus(size: int = 24) -> dict[str, tuple[str, bytes, bool]]:
    """Every awkward image kind: {kind: (file name, bytes, usable?)}. Usable ones are decodable after
    conversion; the others must be skipped and reported (with a pixel limit of 100x100)."""
    generator = np.random.default_rng(7)
    rgb = Image.fromarray(generator.integers(0, 255, (size, size, 3)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("P", (size, size), index) for index in range(3)]
    animated = __import__("io").BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    valid_png = _encoded(rgb, "PNG")
    return {
        "greyscale": ("grey.png", _encoded(rgb.convert("L"), "PNG"), True),
        "rgba": ("alpha.png", _encoded(rgb.convert("RGBA"), "PNG"), True),
        "palette": ("palette.png", _encoded(rgb.convert("P"), "PNG"), True),
        "cmyk": ("cmyk.jpg", _encoded(rgb.convert("CMYK"), "JPEG"), True),
        "16-bit": ("deep.png", _encoded(Image.fromarray((generator.random((size, size)) * 65535).astype(np.uint16)), "PNG"), True),
        "exif-rotated": ("rotated.jpg", _encoded(rgb, "JPEG", exif=exif.tobytes()), True),
        "animated gif": ("animated.gif", animated.getvalue(), True),
        "wrong extension": ("actually_png.jpg", valid_png, True),
        "zero bytes": ("empty.png", b"", False),
        "truncated": ("truncated.png", valid_png[: len(valid_png) // 2], False),
        "random bytes": ("noise.jpg", generator.integers(0, 255, 2048).astype(np.uint8).tobytes(), False),
        "decompression bomb": ("bomb.png", _encoded(Image.new("L", (400, 400)), "PNG"), False),
    }


BOMB_PIXEL_LIMIT = 100 * 100
