"""Decode one image file's bytes into a fixed-size uint8 array, or say exactly why not.

Kept free of Ray so it can be tested and reused on its own; `data.py` maps it over batches.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageDecodeError(Exception):
    """The bytes are not a usable image; the message is what a person reads in the report."""


def has_image_extension(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale would be clipped by Pillow's convert; rescale them instead."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if high > low:
        pixels = (pixels - low) * (255.0 / (high - low))
    else:
        pixels = np.zeros_like(pixels)
    return Image.fromarray(pixels.round().astype(np.uint8), mode="L")


def decode_image(data: bytes, image_size: tuple[int, int], channels: int, max_pixels: int) -> np.ndarray:
    """Return an array of shape (height, width, channels), dtype uint8.

    Anything Pillow can decode is used: EXIF orientation is applied, the first frame of an
    animation is taken, and every mode is converted to RGB or L.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    height, width = image_size
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's warning for large images.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageDecodeError(
                    f"image of {image.width}x{image.height} pixels exceeds the limit of {max_pixels} pixels "
                    "(possible decompression bomb)"
                )
            if image.format == "JPEG":
                # DCT scaling decodes straight to a smaller size: several times faster for big photos.
                image.draft("RGB" if channels == 3 else "L", (width, height))
            image.seek(0)
            image.load()
            # In place: without an orientation tag the default would copy the image for nothing.
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                image = _to_eight_bit(image)
            if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
                # Transparent pixels become white rather than whatever colour they happen to store.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            mode = "RGB" if channels == 3 else "L"
            if image.mode != mode:  # convert() to the same mode would copy
                image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return pixels
