import io

import numpy as np
import pytest
from PIL import Image

from imgcls.images import ImageDecodeError, decode_image, has_image_extension

SIZE = (12, 10)  # height, width: deliberately not square


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("RGB", (40, 30), (200, 10, 10)), "PNG"),
        (Image.new("L", (40, 30), 128), "PNG"),
        (Image.new("RGBA", (40, 30), (0, 0, 255, 255)), "PNG"),
        (Image.new("P", (40, 30), 3), "GIF"),
        (Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "BMP"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "WEBP"),
        (Image.new("I;16", (40, 30), 40000), "PNG"),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_decodable_modes_become_fixed_size_uint8(image, fmt, channels):
    pixels = decode_image(encode(image, fmt), SIZE, channels, max_pixels=10_000)
    assert pixels.shape == (*SIZE, channels)
    assert pixels.dtype == np.uint8


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    pixels = decode_image(encode(image, "JPEG", exif=exif.tobytes()), (40, 20), 1, max_pixels=10_000)
    # After rotation the black half is on top.
    assert pixels[:10].mean() < 60 and pixels[-10:].mean() > 200


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    pixels = decode_image(encode(Image.fromarray(ramp), "PNG"), (30, 40), 1, max_pixels=10_000)
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"\x00\x01random bytes that are not an image" * 10, "not a recognised image format"),
    ],
)
def test_undecodable_bytes_raise_a_clear_error(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, SIZE, 3, max_pixels=10_000)


def test_truncated_file_is_refused():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(data[: len(data) // 2], SIZE, 3, max_pixels=10_000)


def test_pixel_limit_refuses_decompression_bombs():
    data = encode(Image.new("L", (200, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, SIZE, 1, max_pixels=200 * 200 - 1)


def test_image_extensions_are_case_insensitive():
    assert has_image_extension("a/B.JPG") and has_image_extension("x.TiFf") and has_image_extension("y.webp")
    assert not has_image_extension("notes.txt") and not has_image_extension("README")
