"""The contact sheet of a run's review file: thumbnails of its least certain images, each captioned
with its label and margin, as one PNG. An image that cannot be read gets a grey tile saying so."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from imgcls.config.common import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from imgcls.errors import StorageError, UserError, clip
from imgcls.platform import storage
from imgcls.reporting.plots import png_bytes, pyplot

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160  # pixels, the longer side
COLUMNS = 6
UNREADABLE_GREY = 190
# A review file is one row per image of a run's review queue: tens of MB at most.
MAX_REVIEW_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SheetImage:
    rank: int
    path: str
    label: str | None
    margin: float | None
    thumbnail: np.ndarray | None  # None: the image could not be read


def read_review_rows(locations: list[storage.Location], limit: int) -> list[dict] | None:
    """The first `limit` rows by rank of the first of `locations` that holds a readable review file
    (the record's own URI first, then where it lies under this output, for an output that was copied
    or moved); None when none does."""
    import pyarrow.parquet as pq

    for location in locations:
        try:
            table = pq.read_table(io.BytesIO(storage.read_object(location, MAX_REVIEW_BYTES)),
                                  columns=["rank", "path", "label", "margin"])  # fmt: skip
        except (OSError, ValueError, KeyError) as error:  # missing, unreadable, or not a review file
            logger.debug("no review file at %s: %s", location.uri, error)
            continue
        rows = sorted(table.to_pylist(), key=lambda row: (row["rank"] is None, row["rank"]))
        return rows[:limit]
    return None


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """RGB thumbnail of an image's bytes, at most `side` pixels on its longer side, EXIF orientation
    applied. Raises ValueError for bytes that are not a usable image (or one over `max_pixels`)."""
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ValueError(f"image of {image.width}x{image.height} pixels exceeds {max_pixels} pixels")
        image.draft("RGB", (side, side))  # JPEG: decode straight to about the thumbnail's size
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        image = image.convert("RGBA")
        # Transparent pixels on white, not on whatever colour they store.
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image).convert("RGB")
        image.thumbnail((side, side))
    except ValueError:
        raise
    except (OSError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image: {error}") from None
    return np.asarray(image)


def read_thumbnail(path: str, endpoint_url: str | None) -> np.ndarray | None:
    """The thumbnail of one image of the review file, or None (with a warning) when it cannot be read.
    An endpoint that keeps failing (StorageError) stops the report: every other image would wait
    through the same retries."""
    if not path:
        return None
    try:
        return thumbnail(storage.read_object(storage.resolve(path, endpoint_url), DEFAULT_MAX_IMAGE_BYTES))
    except StorageError:
        raise
    # Missing, too large, not a plain file or not an image; a path of no scheme imgcls reads (UserError).
    except (OSError, ValueError, UserError) as error:
        logger.warning("contact sheet: %s is shown as unreadable: %s", clip(path), clip(str(error), 300))
        return None


def sheet_images(rows: list[dict], endpoint_url: str | None) -> list[SheetImage]:
    return [SheetImage(rank=row["rank"], path=row["path"], label=row["label"], margin=row["margin"],
                       thumbnail=read_thumbnail(row["path"], endpoint_url)) for row in rows]  # fmt: skip


def caption(image: SheetImage) -> str:
    margin = "margin n/a" if image.margin is None else f"margin {image.margin:.3f}"
    return f"#{image.rank} {clip(image.label or 'no label', 22)}\n{margin}"


def contact_sheet_png(images: list[SheetImage], title: str) -> bytes:
    """A grid of the thumbnails, COLUMNS wide, each captioned; unreadable images as grey tiles."""
    plt = pyplot()
    columns = max(1, min(COLUMNS, len(images)))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows + 0.4), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image in zip(axes.ravel(), images):
        axis.axis("on")  # a thin frame around each tile: a white or transparent image still shows its place
        axis.set_xticks([])
        axis.set_yticks([])
        if image.thumbnail is None:
            axis.imshow(np.full((THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), UNREADABLE_GREY, dtype=np.uint8))
            axis.text(THUMBNAIL_SIDE / 2, THUMBNAIL_SIDE / 2, "unreadable", ha="center", va="center", fontsize=10)
        else:
            axis.imshow(image.thumbnail)
        axis.set_title(caption(image), fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return png_bytes(figure)
