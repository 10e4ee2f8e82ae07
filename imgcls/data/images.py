"""Decode one image file's bytes into a fixed-size uint8 array, or say exactly why not.

Kept free of Ray so it can be tested and reused on its own; `data.py` maps it over batches.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pixels rescaled at a time from 16/32-bit to 8-bit: about 1 MB of float32 per band of rows.
CHUNK_PIXELS = 1 << 18

# Our own pixel limit in decode_image replaces Pillow's warning for large images. Set once for the
# process: warnings.catch_warnings() per call is not thread-safe, and decoding runs on several threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(Exception):
    """The bytes are not a usable image; the message is what a person reads in the report."""


def has_image_extension(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _row_bands(image: Image.Image):
    """The image as native numpy arrays of a few rows each: never the whole image outside Pillow."""
    rows = max(1, CHUNK_PIXELS // max(image.width, 1))
    for top in range(0, image.height, rows):
        bottom = min(top + rows, image.height)
        yield top, bottom, np.asarray(image.crop((0, top, image.width, bottom)))


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale would be clipped by Pillow's convert; rescale them instead:
    round((p - low) * 255 / (high - low)), in bands of rows so memory stays bounded (never a float
    copy of the whole image)."""
    low = high = None
    for _, _, values in _row_bands(image):
        band_low, band_high = values.min(), values.max()
        # min() with NaN anywhere gives NaN, which (as before) turns the whole image black below.
        low = band_low if low is None else np.minimum(low, band_low)
        high = band_high if high is None else np.maximum(high, band_high)
    eight_bit = np.zeros((image.height, image.width), dtype=np.uint8)
    if low is None or not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return Image.fromarray(eight_bit)
    integer = np.asarray(low).dtype.kind in "iu"
    low_value = int(low) if integer else float(low)
    scale = np.float32(255.0 / (float(high) - float(low)))
    for top, bottom, values in _row_bands(image):
        if integer:
            # Subtract in int64 first: 32-bit values near 2**31 would lose their low bits as float32.
            shifted = np.subtract(values, low_value, dtype=np.int64).astype(np.float32)
        else:
            shifted = np.subtract(values, np.float32(low_value), dtype=np.float32)
        shifted *= scale
        np.rint(shifted, out=shifted)  # half to even, as numpy's round() was
        np.clip(shifted, 0, 255, out=shifted)
        eight_bit[top:bottom] = shifted
    return Image.fromarray(eight_bit)


def decode_image(data: bytes, image_size: tuple[int, int], channels: int, max_pixels: int) -> np.ndarray:
    """Return an array of shape (height, width, channels), dtype uint8.

    Anything Pillow can decode is used: EXIF orientation is applied, the first frame of an
    animation is taken, and every mode is converted to RGB or L.
    """
    return decode_image_and_size(data, image_size, channels, max_pixels)[0]


def decode_image_and_size(
    data: bytes, image_size: tuple[int, int], channels: int, max_pixels: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`, and the image's own (width, height) as stored (before orientation and resizing)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    height, width = image_size
    try:
        # Pillow refuses images above twice its own process-wide limit whatever max_pixels allows:
        # raise that limit to ours when ours is higher, never lower it (the rest of the process uses
        # Pillow too). The explicit check below is the one that decides.
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageDecodeError(
                f"image of {image.width}x{image.height} pixels exceeds the limit of {max_pixels} pixels "
                "(possible decompression bomb)"
            )
        original_size = (image.width, image.height)
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
        # Pillow's own refusal, at twice its limit (at least max_pixels, see above): such an image is
        # over our limit too. Its message names a limit the user never configured; keep its pixel count.
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"image of {found.group(1)} pixels" if found else "image"
        raise ImageDecodeError(
            f"{size} exceeds the limit of {max_pixels} pixels: refused as a possible decompression bomb"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return pixels, original_size
