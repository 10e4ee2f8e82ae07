"""Bytes to decoded blocks: read each listed file or object (bounded) and decode it to the model's
size; every failure becomes that row's error string. Used on threads in the job's process and as
Ray Data tasks alike."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np

from imgcls.config import DEFAULT_MAX_IMAGE_BYTES, StorageConfig
from imgcls.data.images import ImageDecodeError, decode_image_and_size
from imgcls.errors import StorageError, UserError
from imgcls.platform import storage

# Concurrent object reads per decode task: fetching from an object store is latency-bound.
REMOTE_READ_THREADS = 16


class UnusablePathError(OSError):
    """A listed path that names no readable image location (a URL, a NUL byte): that row's error."""


def _read_each(paths: list[str], endpoint_url: str | None, max_bytes: int) -> Iterator[bytes | OSError]:
    """Bytes of every path in order (at most `max_bytes` each), or the OSError that reading it raised.
    Remote objects are fetched concurrently (and held until decoded); local files one at a time as
    they are decoded, so a block never holds all its encoded files at once."""

    def read_one(path: str) -> bytes | OSError:
        try:
            if "\x00" in path:
                raise UnusablePathError("invalid path: it contains a NUL byte")
            if os.path.isabs(path):  # listed local files: skip resolving a filesystem per file
                return storage.read_local_file(path, max_bytes)
            return storage.read_object(storage.resolve(path, endpoint_url), max_bytes)
        except StorageError:  # the endpoint kept failing after the client's retries: the run fails
            raise
        except UserError as error:  # e.g. an http:// URL in a manifest: this row fails, not the run
            return UnusablePathError(str(error))
        except OSError as error:
            return error

    if paths and "://" in paths[0]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(paths))) as pool:
            yield from pool.map(read_one, paths)
        return
    for path in paths:
        yield read_one(path)


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: tuple[int, int],
    channels: int,
    max_pixels: int,
    storage_config: StorageConfig | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    digests: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: read and decode every path in the batch; failures become an `error` string,
    except an endpoint that kept failing through the client's retries: that StorageError ends the run.

    Every row gets an image of the same shape (zeros on error), so Arrow never sees ragged arrays,
    and the image's own `original_width` and `original_height` (0 on error). With `digests`, also
    `content_digest`: a BLAKE2b digest of the file's bytes ("" when unread), to find exact duplicates.
    `storage_config` is the job's: its endpoint, and the retry settings this process then uses.
    """
    endpoint_url = None
    if storage_config is not None:
        storage.configure(storage_config)
        endpoint_url = storage_config.endpoint_url
    paths = [str(path) for path in batch["path"]]
    height, width = image_size
    images = np.zeros((len(paths), height, width, channels), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    digest_column = np.full(len(paths), "", dtype=object)
    for row, payload in enumerate(_read_each(paths, endpoint_url, max_bytes)):
        if isinstance(payload, UnusablePathError):
            errors[row] = str(payload)
            continue
        if isinstance(payload, OSError):
            errors[row] = f"cannot read file: {_read_failure(payload)}"
            continue
        if digests:
            digest_column[row] = hashlib.blake2b(payload, digest_size=16).hexdigest()
        try:
            images[row], sizes[row] = decode_image_and_size(payload, image_size, channels, max_pixels)
        except ImageDecodeError as error:
            errors[row] = str(error)
    output = dict(batch)
    output["image"] = images
    output["error"] = errors.astype(str)
    output["original_width"] = sizes[:, 0]
    output["original_height"] = sizes[:, 1]
    if digests:
        output["content_digest"] = digest_column.astype(str)
    return output


def _read_failure(error: OSError) -> str:
    """The reason alone: the row already names the path."""
    return error.strerror if error.strerror and error.filename else str(error)
