import io

import numpy as np
import pytest
from PIL import Image

from imgcls.data.images import ImageDecodeError, decode_image, has_image_extension

SIZE = (12, 10)  # height, width: deliberately not square
# imgcls.data.images silences this warning once for the process, but pytest drops filters that modules add
# while it imports them (test_pillows_bomb_warning_is_silenced_for_the_whole_process checks it outside).
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


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


@pytest.fixture
def pillow_limit_restored(monkeypatch):
    # decode_image may raise Pillow's process-wide limit (crop() checks it too): start from Pillow's
    # default, and leave it as other tests found it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)


def test_a_low_limit_never_lowers_pillows_limit_for_the_rest_of_the_process(pillow_limit_restored):
    """A lowered process-wide limit made later, unrelated Pillow use in the same process (a report's
    figure) fail as a decompression bomb."""
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 10000 pixels"):
        decode_image(encode(Image.new("L", (200, 200)), "PNG"), (8, 8), 1, max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    Image.open(io.BytesIO(encode(Image.new("L", (500, 500)), "PNG"))).load()


def eight_bit_by_the_old_formula(image: Image.Image) -> np.ndarray:
    """The float64 rescale over the whole image that _to_eight_bit replaced: the reference result."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return ((pixels - low) * (255.0 / (high - low))).round().astype(np.uint8)


def test_sixteen_bit_rescale_is_exactly_the_old_formula_on_a_known_image():
    # Every multiple of 257 maps to a whole grey level, and the odd values in between round both ways.
    known = np.concatenate([np.arange(256) * 257, [0, 128, 129, 385, 65534, 65535, 40000, 1]]).astype(np.uint16)
    image = Image.fromarray(known.reshape(8, 33))
    pixels = decode_image(encode(image, "PNG"), (8, 33), 1, max_pixels=10_000)
    expected = eight_bit_by_the_old_formula(image)
    np.testing.assert_array_equal(pixels[:, :, 0], expected)
    assert expected.ravel()[:256].tolist() == list(range(256))


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).integers(300, 61000, (700, 900)).astype(np.uint16),
        np.random.default_rng(2).integers(-(2**31), 2**31 - 1, (300, 500)).astype(np.int32),
        (np.random.default_rng(3).random((300, 500)) * 2e6 - 1e6).astype(np.float32),
    ],
    ids=["16-bit", "32-bit integer", "32-bit float"],
)
def test_deep_images_match_the_old_formula_within_one_grey_level(values, pillow_limit_restored):
    from imgcls.data.images import _to_eight_bit

    image = Image.fromarray(values)
    rescaled = np.asarray(_to_eight_bit(image)).astype(np.int16)
    difference = np.abs(rescaled - eight_bit_by_the_old_formula(image))
    assert difference.max() <= 1 and difference.mean() < 0.001
    assert rescaled.min() == 0 and rescaled.max() == 255


def test_a_flat_deep_image_becomes_black(pillow_limit_restored):
    from imgcls.data.images import _to_eight_bit

    assert np.asarray(_to_eight_bit(Image.new("I;16", (50, 40), 1234))).max() == 0


def test_sixteen_bit_decoding_memory_is_bounded():
    """numpy reports its allocations to tracemalloc; the old float64 rescale peaked at 12x the uint16
    array, the banded one holds the 8-bit result (half of it) and one band at a time."""
    import tracemalloc

    side = 3000
    ramp = (np.add.outer(np.arange(side), np.arange(side)) * (65535 / (2 * side - 2))).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    tracemalloc.start()
    try:
        pixels = decode_image(data, (30, 30), 1, max_pixels=side * side)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # About 0.76x here; the whole image as one native numpy array would already be 1.5x (2x while copied).
    assert peak < 1.25 * ramp.nbytes, f"peak {peak / 1e6:.1f} MB for a {ramp.nbytes / 1e6:.1f} MB 16-bit image"
    assert pixels[0, 0, 0] < 10 and pixels[-1, -1, 0] > 245


@pytest.fixture(scope="module")
def above_pillows_limit() -> tuple[bytes, int]:
    """A 14000x14000 black-and-white PNG: 196,000,000 pixels, above the 178,956,970 at which Pillow's
    default limit refuses an image; tiny as a file."""
    side = 14_000
    return encode(Image.new("1", (side, side)), "PNG"), side * side


def test_max_pixels_above_pillows_default_is_honoured(above_pillows_limit, pillow_limit_restored):
    data, pixels = above_pillows_limit
    assert pixels > 2 * 89_478_485
    decoded = decode_image(data, (8, 8), 1, max_pixels=pixels)
    assert decoded.shape == (8, 8, 1) and decoded.max() == 0


@pytest.mark.parametrize(
    "below, message",
    [
        (1, "image of 14000x14000 pixels exceeds the limit of 195999999 pixels (possible decompression bomb)"),
        # Over twice the limit Pillow itself refuses at open; the message gives our limit, not its doubled one.
        (100_000_000, "image of 196000000 pixels exceeds the limit of 96000000 pixels: refused as a possible decompression bomb"),
    ],
    ids=["just below", "well below"],
)
def test_max_pixels_below_the_image_refuses_it(above_pillows_limit, pillow_limit_restored, below, message):
    data, pixels = above_pillows_limit
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, (8, 8), 1, max_pixels=pixels - below)
    assert str(caught.value) == message


BOMB_WARNING_SCRIPT = """
import io, sys
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from imgcls.data.images import ImageDecodeError, decode_image
buffer = io.BytesIO()
Image.new("L", (150, 150)).save(buffer, "PNG")
def attempt(_):
    try:
        decode_image(buffer.getvalue(), (8, 8), 1, max_pixels=20_000)  # 22,500 pixels: Pillow warns at open
    except ImageDecodeError as error:
        return str(error)
with ThreadPoolExecutor(8) as pool:
    print(set(pool.map(attempt, range(64))))
"""


def test_pillows_bomb_warning_is_silenced_for_the_whole_process():
    """One module-level filter, not a per-call catch_warnings (not thread-safe): decoding on several
    threads prints no DecompressionBombWarning even with every warning shown (-W default). In a fresh
    process, since pytest drops the filters a module adds while pytest imports it."""
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-W", "default", "-c", BOMB_WARNING_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "{'image of 150x150 pixels exceeds the limit of 20000 pixels (possible decompression bomb)'}"
    assert "DecompressionBombWarning" not in completed.stderr, completed.stderr[-2000:]
